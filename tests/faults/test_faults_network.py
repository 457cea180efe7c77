"""The network, for real: children run online (HF_HUB_OFFLINE=0) against a local socket server posing as the hub
(HF_ENDPOINT), with every connect / getaddrinfo recorded by an audit hook. A hub that stalls, resets or answers
garbage must end in a fastload error naming the network within a bounded time; a model that is cached must need
no network at all, for loading, saving, generating and training (the repo id and HF_TOKEN never leave)."""

from __future__ import annotations

import shutil

import pytest

from faults.faultkit import assert_fastload_error, assert_ran, code

BOUND_S = 15  # what a user waits at most before being told the hub does not answer


def network_events(outcome) -> list:
    """Connections and name lookups towards another machine or the fake hub (local UNIX sockets are not network)."""
    return [e for e in outcome.network if e[0] != "socket.connect" or e[1].startswith("((")]


@pytest.fixture(scope="session")
def cached_repo(online_worker, fault_scratch, tiny_llama) -> str:
    """The tiny model as the hub repo faultorg/tiny-cached, fully in the online children's Hugging Face cache."""
    repo = fault_scratch / "hf-home-online" / "hub" / "models--faultorg--tiny-cached"
    commit = "c" * 40
    shutil.copytree(tiny_llama, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return "faultorg/tiny-cached"


def online(worker, text, case_dir, timeout=60, **values):
    return worker.run(code(text, **values), env={"FASTLOAD_HOME": str(case_dir / "home")}, audit=True,
                      timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stall", "reset", "garbage"])
def test_uncached_model_against_a_broken_hub_is_a_bounded_network_error(online_worker, hub, case_dir, mode):
    """Issue 19 item 16. User loses: a load that waits forever (stall) or a generic error; sees, within
    BOUND_S seconds, a fastload error naming the hub it could not use."""
    hub.mode = mode
    outcome = online(online_worker, "ops.load('faultorg/not-cached-anywhere', store=False)", case_dir,
                     timeout=BOUND_S + 5)
    assert not outcome.timed_out and outcome.elapsed < BOUND_S, f"the load ran {outcome.elapsed:.0f} s against a " \
                                                                f"{mode} hub"
    assert_fastload_error(outcome, what=f"a {mode} hub")
    msg = outcome.error["message"].lower()
    assert any(w in msg for w in ("network", "hub", "connect", "endpoint", "timed out", "timeout")), msg[:600]


def test_resolve_of_an_uncached_model_makes_no_connection(online_worker, hub, case_dir):
    """`fastload.resolve` promises to read nothing and touch no network: the plan says 'will download' only."""
    outcome = online(online_worker, """
        import fastload
        plan = fastload.resolve("faultorg/not-cached-anywhere")
        result["will_download"] = plan.will_download
    """, case_dir)
    assert_ran(outcome)
    assert network_events(outcome) == [] and hub.connections == 0, network_events(outcome)


@pytest.mark.parametrize("step", ["load", "save_adapter", "save_merged", "generate"])
def test_a_cached_model_needs_no_network(online_worker, hub, case_dir, cached_repo, step):
    """Issue 19 item 13. User loses: the repo id and HF_TOKEN sent to the hub, and a 10 s stall per save against a
    slow hub, for a model that is entirely on disk."""
    steps = {
        "load": "",
        "save_adapter": "FastModel.save_adapter(m, out, tokenizer=t)",
        "save_merged": "FastModel.save_merged(m, out, tokenizer=t)",
        "generate": "FastModel.generate(FastModel.for_inference(m), t, 'hi', max_new_tokens=2)",
    }
    outcome = online(online_worker, """
        from fastload import FastModel
        m, t = ops.load(repo, store=False)
        exec(step)
    """, case_dir, repo=cached_repo, out=case_dir / "out", step=steps[step])
    assert_ran(outcome, step)
    assert network_events(outcome) == [] and hub.connections == 0, \
        f"{step} of a cached model reached the network: {network_events(outcome)[:5]} ({hub.connections} accepted)"


@pytest.mark.slow
def test_training_checkpoints_of_a_cached_model_need_no_network(online_worker, hub, case_dir, cached_repo):
    """Every Trainer checkpoint saves the adapter: none may contact the hub."""
    outcome = online(online_worker, """
        from fastload import FastModel
        m, t = ops.load(repo, store=False, max_seq_length=64)
        records = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(4)]
        args = FastModel.training_arguments(out, model=m, max_steps=1, save_steps=1, per_device_train_batch_size=2,
                                            logging_steps=1)
        FastModel.get_trainer(m, t, records, args=args).train()
    """, case_dir, timeout=120, repo=cached_repo, out=case_dir / "run")
    assert_ran(outcome, "training")
    assert network_events(outcome) == [] and hub.connections == 0, network_events(outcome)[:5]


@pytest.mark.parametrize("argv", [["resolve", "faultorg/tiny-cached"], ["cache", "list"], ["registry", "list"],
                                  ["registry", "show", "llama-3-8b"], ["estimate", "faultorg/tiny-cached"]],
                         ids=["resolve", "cache-list", "registry-list", "registry-show", "estimate"])
def test_light_commands_make_no_connection(online_worker, hub, case_dir, cached_repo, argv):
    outcome = online(online_worker, "result['run'] = ops.cli(*argv)", case_dir, argv=argv)
    assert_ran(outcome)
    assert outcome.result["run"]["code"] == 0, outcome.result["run"]["stderr"][-600:]
    assert network_events(outcome) == [] and hub.connections == 0, network_events(outcome)[:5]


@pytest.mark.slow
def test_estimate_of_an_uncached_registry_model_against_a_stalled_hub_is_bounded(online_worker, hub, case_dir):
    """`fastload estimate NAME` may ask the hub for a config; against a stalled hub it must still end in time,
    with the registry's approximate figure or a fastload error."""
    outcome = online(online_worker, "result['run'] = ops.cli('estimate', 'llama-3-8b')", case_dir, timeout=BOUND_S + 5)
    assert not outcome.timed_out and outcome.elapsed < BOUND_S, f"estimate ran {outcome.elapsed:.0f} s"
    assert_ran(outcome)
    assert outcome.result["run"]["escaped"] is None, outcome.result["run"]["escaped"]


def test_token_is_not_sent_when_the_model_is_cached(online_worker, hub, case_dir, cached_repo):
    """With HF_TOKEN in the environment and the hub answering garbage, a cached load still works: nothing was
    asked of the hub, so neither the token nor the repo id left the machine."""
    hub.mode = "garbage"
    outcome = online(online_worker, "m, t = ops.load(repo, store=True)", case_dir, repo=cached_repo)
    assert_ran(outcome, "cached load with a broken hub")
    assert hub.connections == 0, f"{hub.connections} connection(s) reached the hub"
