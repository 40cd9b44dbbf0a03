"""The OpenAI protocol, with no server and no device arrays in it.

    JSON body -> protocol (pydantic request models: types, shapes, prompt xor messages)
              -> translate (SamplingParams, prompts as text or token ids)
    RequestOutputs (cumulative, from the engine) -> responses (whole responses, or stream
              chunks built from the difference to what was already sent)
    anything refused -> errors.APIError -> {"error": {"message", "type", "param", "code"}}

The server (jaxserve.server) decides threads and transport; this package only maps data.
"""
