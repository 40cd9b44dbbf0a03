"""multihost.py in one process (jax.distributed's broadcast is then the identity; the two-process
server test, tests/server/test_multihost.py, runs the real collectives):

- InputBroadcast carries any turn's inputs, short (one broadcast) or long (a second one);
- the config digest ignores the cache folder and nothing else;
- a follower's loop applies the leader's inputs in order and steps as the leader does: two
  engines fed the same inputs, seeded alike, sample the same tokens (unseeded requests too).
"""

from __future__ import annotations

import dataclasses

from jaxserve.config import EngineConfig
from jaxserve.engine import multihost
from jaxserve.engine.core_loop import CoreLoop
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.engine.messages import Abort, AddRequest, FinishStopped, ResetPrefixCache, Shutdown
from jaxserve.sampling_params import SamplingParams
from tests.engine.mock_model import SumModel

V = 101


def test_broadcast_round_trip_short_and_long():
    leader = multihost.InputBroadcast(is_leader=True)
    params = SamplingParams(temperature=0.5, max_tokens=3, stop=["x"], seed=7)
    short = [AddRequest("a", [1, 2, 3], params), Abort("b"), FinishStopped("c#0", "x"), ResetPrefixCache(4)]
    long = [AddRequest("long", list(range(5000)), params), Shutdown()]  # > FIRST_BYTES: a second broadcast
    assert leader.exchange(short) == short
    assert leader.exchange(long) == long
    assert leader.exchange([]) == []
    assert (leader.exchanges, leader.inputs) == (3, 6)


def test_config_digest_ignores_only_the_cache_folder():
    base = EngineConfig(max_num_seqs=4)
    assert multihost.config_digest(base) == multihost.config_digest(dataclasses.replace(base, cache_dir="/elsewhere"))
    assert multihost.config_digest(base) != multihost.config_digest(dataclasses.replace(base, max_num_seqs=8))
    assert multihost.agree(base, 1234) == 1234  # one process: its own seed


class Scripted:
    """A follower's broadcast: the leader's turns, as recorded."""

    def __init__(self, turns):
        self.turns, self.exchanges, self.inputs = list(turns), 0, 0

    def exchange(self, inputs):
        self.exchanges += 1
        return self.turns.pop(0) if self.turns else [Shutdown()]


def make_engine() -> LLMEngine:
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, page_size=4, num_kv_pages=64, max_model_len=128)
    return LLMEngine(config, model=SumModel(V), tokenizer=None, progress=False, log=lambda *_: None)


def test_follower_samples_what_the_leader_samples():
    hot = SamplingParams(temperature=8.0, max_tokens=12, ignore_eos=True)  # unseeded: drawn from the core's rng
    turns = [[AddRequest("a", [1, 2, 3], hot), AddRequest("b", [4, 5], hot)], [], [Abort("b")], []]
    turns += [[]] * 20

    class Recorder:
        def __init__(self):
            self.tokens: dict[str, list[int]] = {}

        def steps(self, outputs):
            for out in outputs:
                for rid, tok in zip(out.request_ids, out.token_ids):
                    self.tokens.setdefault(rid, []).append(tok)

        def failed(self, request_ids, error):
            raise AssertionError(error)

        def reply(self, call_id, value):
            pass

    leader, follower = make_engine(), make_engine()
    leader.core.reseed(99)
    follower.core.reseed(99)
    recorded = Recorder()
    loop = CoreLoop(leader.core, recorded)
    for turn in turns:  # the leader's side of core_process.serve, without sockets
        for message in turn:
            loop.apply(message)
        loop.turn()

    class Mirror(multihost.FollowerSink, Recorder):
        def __init__(self):
            multihost.FollowerSink.__init__(self, log=lambda *_: None)
            Recorder.__init__(self)

        def steps(self, outputs):
            Recorder.steps(self, outputs)

    mirror = Mirror()
    multihost.follow(follower.core, Scripted(turns), log=lambda *_: None, sink=mirror)
    assert len(recorded.tokens["a"]) == 12 and len(recorded.tokens.get("b", [])) < 12
    assert mirror.tokens == recorded.tokens
    assert not follower.core.has_work()
