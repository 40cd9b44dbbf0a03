"""`jaxserve chat`: one offline chat answer from the embedded default model."""

from jaxserve.cli import main


def test_chat_answers_with_the_default_model(capsys, smollm2_folder):
    assert main(["chat", "What is the capital of France?", "--max-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "assistant:" in out and "Paris" in out
