"""A corpus of bad inputs through the CLI (`onalign run --dry-run ...`, in-process): each is answered before
any actor or Ray starts, with exit code 2 and one line `onalign: error: ...` that names the config key or
the file at fault (no traceback); valid inputs pass the same checks and print the plan. A dry run writes
nothing into output_dir."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from pipeline.cli import main

DEMO = "configs/demo-cpu.yaml"
SMALL = ["data.num_train_prompts=24", "data.num_eval_prompts=6"]
WORDS = [f"w{i:02d}q" for i in range(24)]


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Any Ray start fails the test: every check here must run before one."""
    import ray

    import pipeline.driver

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(pipeline.driver, "init_ray", refuse)


def jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def score_server() -> str:
    """A remote reward server on loopback that gives every response 0.5 (lives as long as the test process)."""
    import json

    from reward_server import start_reward_server

    url, _ = start_reward_server(
        lambda body: json.dumps({"scores": [0.5] * len(json.loads(body)["responses"])}).encode()
    )
    return url


@pytest.fixture(scope="module")
def files(tmp_path_factory, model_path) -> dict[str, str]:
    """Every bad (and good) file the corpus points at, made once."""
    import datasets

    datasets.disable_progress_bars()
    d = tmp_path_factory.mktemp("inputs")
    f: dict[str, str] = {"dir": str(d), "score_url": score_server()}
    good = [{"prompt": f"reverse: {w}", "response": w[::-1]} for w in WORDS]
    f["good"] = jsonl(d / "good.jsonl", good)
    f["conv"] = jsonl(
        d / "conv.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "Ready?"}, {"role": "assistant", "content": "Yes."}]
                + [{"role": "user", "content": f"reverse: {w}"}],
                "completion": [{"role": "assistant", "content": w[::-1]}],
            }
            for w in WORDS
        ],
    )
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(good), "test": datasets.Dataset.from_list(good[:4])}
    ).save_to_disk(str(d / "dd"))
    f["dd"] = str(d / "dd")
    f["no_response"] = jsonl(d / "no_response.jsonl", [{"prompt": f"reverse: {w}"} for w in WORDS])
    (d / "empty.jsonl").write_text("")
    f["empty"] = str(d / "empty.jsonl")
    f["bad_line"] = jsonl(d / "bad_line.jsonl", [good[0], '{"prompt": "x"', good[1]])
    f["no_column"] = jsonl(d / "no_column.jsonl", [{"question": f"q{i}"} for i in range(5)])
    f["int_prompts"] = jsonl(d / "int_prompts.jsonl", [{"prompt": i} for i in range(5)])
    f["not_messages"] = jsonl(d / "not_messages.jsonl", [{"messages": "hello"}] * 3)
    f["ends_assistant"] = jsonl(
        d / "ends_assistant.jsonl",
        [{"prompt": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(4)],
    )
    f["one_row"] = jsonl(d / "one_row.jsonl", [good[0]])
    f["same_prompt"] = jsonl(d / "same_prompt.jsonl", [good[0]] * 6)
    f["long"] = jsonl(d / "long.jsonl", [{"prompt": f"reverse: {w} " + "x" * 400} for w in WORDS])
    (d / "data.txt").write_text("reverse: abc\n")
    f["txt"] = str(d / "data.txt")
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    f["latin1"] = str(d / "latin1.jsonl")
    (d / "bad.csv").write_text("prompt,response\na,b\nc,d,e\n")
    f["bad_csv"] = str(d / "bad.csv")
    (d / "plain_dir").mkdir()
    (d / "plain_dir" / "notes.md").write_text("x")
    f["plain_dir"] = str(d / "plain_dir")
    # configs
    (d / "bad.yaml").write_text("iterations: [1, 2\n")
    (d / "list.yaml").write_text("- iterations: 1\n")
    (d / "base_missing.yaml").write_text("base: nowhere.yaml\niterations: 1\n")
    (d / "loop.yaml").write_text("base: loop.yaml\n")
    (d / "latin1.yaml").write_bytes(b"# caf\xe9\niterations: 1\n")
    (d / "section.yaml").write_text(f"base: {Path(DEMO).resolve()}\nrollout: 4\n")
    # reward functions
    (d / "broken_reward.py").write_text("def score(prompts, responses, refs)\n    return [0.0] * len(responses)\n")
    f["broken_reward"] = str(d / "broken_reward.py")
    # model directories
    nochat = d / "model_without_chat_template"
    shutil.copytree(model_path, nochat)
    (nochat / "chat_template.jinja").unlink()
    cfg = json.loads((nochat / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (nochat / "tokenizer_config.json").write_text(json.dumps(cfg))
    f["nochat"] = str(nochat)
    noconfig = d / "model_without_config"
    noconfig.mkdir()
    (noconfig / "model.safetensors").write_bytes(b"x")
    f["noconfig"] = str(noconfig)
    pickle = d / "model_pickle_only"
    pickle.mkdir()
    (pickle / "config.json").write_text("{}")
    (pickle / "pytorch_model.bin").write_bytes(b"x")
    f["pickle"] = str(pickle)
    badconfig = d / "model_bad_config"
    shutil.copytree(model_path, badconfig)
    (badconfig / "config.json").write_text("{not json")
    f["badconfig"] = str(badconfig)
    notok = d / "model_without_tokenizer"
    notok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(model_path) / name, notok / name)
    f["notok"] = str(notok)
    f["model_file"] = str(Path(model_path) / "config.json")
    # run directories
    f["held"] = str(d / "held_run")
    Path(f["held"]).mkdir()
    jsonl(Path(f["held"]) / "metrics.jsonl", [{"iteration": 0}, {"iteration": 1}])
    f["damaged"] = str(d / "damaged_run")
    Path(f["damaged"]).mkdir()
    jsonl(Path(f["damaged"]) / "metrics.jsonl", [{"iteration": 0}, "{oops", {"iteration": 1}])
    f["other_beta"] = str(d / "other_beta_run")
    run = Path(f["other_beta"])
    ckpt = run / "checkpoints" / "iter_1"
    shutil.copytree(model_path, ckpt / "policy")
    fingerprint = {"model": "builtin:tiny", "algorithm": "dpo", "train_prompts": 24, "eval_prompts": 6}
    fingerprint |= {"data": "builtin:reverse", "seed": 0}
    state = {"format": 1, "iteration": 1, "fingerprint": fingerprint, "initial_eval_rewards": [], "reward_state": {}}
    (ckpt / "state.json").write_text(json.dumps(state))
    from common.config_files import load_config

    saved = load_config(DEMO, [*SMALL, f"output_dir={run}", "algorithm.beta=0.5"])
    (run / "config.yaml").write_text(saved.to_yaml())
    jsonl(run / "metrics.jsonl", [{"iteration": 0}, {"iteration": 1}])
    f["file"] = str(d / "a_file")
    Path(f["file"]).write_text("x")
    return f


# (id, config, overrides (with {name} from `files`), extra flags, what the message must name)
BAD = [
    # config keys, types, ranges, cross-checks
    ("unknown-key", DEMO, ["algoritm.name=dpo"], [], "algorithm"),
    ("unknown-nested-key", DEMO, ["rollout.temprature=1"], [], "rollout.temperature"),
    ("wrong-type", DEMO, ["iterations=many"], [], "iterations"),
    ("out-of-range", DEMO, ["rollout.top_p=1.5"], [], "rollout.top_p"),
    ("negative-seed", DEMO, ["seed=-1", "data.train={good}"], [], "seed"),
    ("huge-seed", DEMO, ["seed=99999999999"], [], "seed"),
    ("unknown-method", DEMO, ["algorithm.name=dpx"], [], "algorithm.name"),
    ("too-few-samples", DEMO, ["rollout.n_samples=1"], [], "rollout.n_samples"),
    ("greedy-pairs", DEMO, ["rollout.temperature=0"], [], "rollout.temperature"),
    ("override-without-value", DEMO, ["iterations"], [], "iterations"),
    ("remote-without-url", DEMO, ["reward.kind=remote"], [], "reward.url"),
    ("url-without-scheme", DEMO, ["reward.kind=remote", "reward.url=localhost:8000/score"], [], "reward.url"),
    ("url-ftp", DEMO, ["reward.kind=remote", "reward.url=ftp://host/score"], [], "reward.url"),
    ("model-reward-without-path", DEMO, ["reward.kind=model"], [], "reward.model_path"),
    ("offload-needs-zero3", DEMO, ["train.offload_params=true"], [], "train.offload_params"),
    ("rho-without-selection", DEMO, ["selection.rho=0.5"], [], "selection.rho"),
    ("prompt-longer-than-context", DEMO, ["data.max_prompt_length=300"], [], "rollout.max_model_len"),
    ("bad-resume-value", DEMO, ["resume=maybe"], [], "resume"),
    ("bad-enum", DEMO, ["model.dtype=float16"], [], "model.dtype"),
    ("section-as-value", DEMO, ["model=3"], [], "model"),
    ("fresh-prompts-and-optune", DEMO, ["data.prompts_per_iteration=4", "selection.mode=random"], [], "selection"),
    ("tp-with-fractional-gpu", DEMO, ["rollout.num_gpus=0.5", "rollout.tensor_parallel_size=2"], [], "rollout"),
    # config files
    ("missing-config", "{dir}/nope.yaml", [], [], "nope.yaml"),
    ("bad-yaml", "{dir}/bad.yaml", [], [], "bad.yaml"),
    ("yaml-list", "{dir}/list.yaml", [], [], "list.yaml"),
    ("missing-base", "{dir}/base_missing.yaml", [], [], "nowhere.yaml"),
    ("base-loop", "{dir}/loop.yaml", [], [], "loop.yaml"),
    ("yaml-not-utf8", "{dir}/latin1.yaml", [], [], "latin1.yaml"),
    ("yaml-section-as-value", "{dir}/section.yaml", [], [], "rollout"),
    # data
    ("missing-data-file", DEMO, ["data.train={dir}/nope.jsonl"], [], "nope.jsonl"),
    ("empty-data-file", DEMO, ["data.train={empty}"], [], "empty.jsonl"),
    ("malformed-jsonl-line", DEMO, ["data.train={bad_line}"], [], "bad_line.jsonl: could not be read: line 2"),
    ("missing-columns", DEMO, ["data.train={no_column}"], [], "no_column.jsonl"),
    ("prompt-not-text", DEMO, ["data.train={int_prompts}"], [], "int_prompts.jsonl"),
    ("messages-not-a-list", DEMO, ["data.train={not_messages}"], [], "not_messages.jsonl"),
    ("prompt-ends-with-answer", DEMO, ["data.train={ends_assistant}"], [], "ends_assistant.jsonl"),
    ("unsupported-file-type", DEMO, ["data.train={txt}"], [], "data.txt"),
    ("data-not-utf8", DEMO, ["data.train={latin1}"], [], "latin1.jsonl"),
    ("malformed-csv", DEMO, ["data.train={bad_csv}"], [], "bad.csv: could not be read: line 3"),
    ("dir-not-a-dataset", DEMO, ["data.train={plain_dir}"], [], "plain_dir"),
    ("dataset-dict-without-split", DEMO, ["data.train={dd}", "data.split=validation"], [], "data.split"),
    ("one-row", DEMO, ["data.train={one_row}"], [], "one_row.jsonl"),
    ("all-prompts-too-long", DEMO, ["data.train={long}"], [], "data.max_prompt_length"),
    ("dedups-to-one-prompt", DEMO, ["data.train={same_prompt}", "data.eval={same_prompt}"], [], "data.train"),
    (
        "spin-without-targets",
        DEMO,
        ["data.train={no_response}", "algorithm.name=spin", "rollout.n_samples=1"],
        [],
        "data",
    ),
    ("missing-eval-file", DEMO, ["data.train={good}", "data.eval={dir}/nope_eval.jsonl"], [], "nope_eval.jsonl"),
    ("eval-file-with-builtin-task", DEMO, ["data.eval={good}"], [], "data.eval"),
    # rewards
    ("reward-no-such-function", DEMO, ["reward.function=rewards.functions:nope"], [], "reward.function"),
    ("reward-no-such-module", DEMO, ["reward.function=no_such_module:f"], [], "reward.function"),
    ("reward-spec-without-colon", DEMO, ["reward.function=rewards.functions"], [], "reward.function"),
    ("reward-file-missing", DEMO, ["reward.function={dir}/nope.py:score"], [], "reward.function"),
    ("reward-file-syntax-error", DEMO, ["reward.function={broken_reward}:score"], [], "broken_reward.py"),
    ("reward-model-missing", DEMO, ["reward.kind=model", "reward.model_path=/nonexistent/rm"], [], "reward.model_path"),
    (
        "reward-model-not-cached",
        DEMO,
        ["reward.kind=model", "reward.model_path=org/no-such-rm"],
        [],
        "reward.model_path",
    ),
    # models
    ("relative-model-path", DEMO, ["model.path=models/mine"], [], "model.path"),
    ("absolute-model-path", DEMO, ["model.path=/nonexistent/model"], [], "model.path"),
    ("hub-name-not-cached", DEMO, ["model.path=someorg/no-such-model"], [], "model.path"),
    ("not-a-hub-name", DEMO, ["model.path=a/b/c/d"], [], "model.path"),
    ("model-is-a-file", DEMO, ["model.path={model_file}"], [], "model.path"),
    ("model-without-config", DEMO, ["model.path={noconfig}"], [], "model.path"),
    ("model-without-safetensors", DEMO, ["model.path={pickle}"], [], "model.path"),
    ("model-config-not-json", DEMO, ["model.path={badconfig}"], [], "model.path"),
    ("model-without-tokenizer", DEMO, ["model.path={notok}"], [], "has no tokenizer"),
    ("model-without-chat-template", DEMO, ["model.path={nochat}"], [], "chat template"),
    # output_dir and resume
    ("output-dir-holds-a-run", DEMO, ["output_dir={held}"], [], "output_dir"),
    ("output-dir-under-a-file", DEMO, ["output_dir={file}/run"], [], "output_dir"),
    ("resume-missing-dir", DEMO, ["output_dir={dir}/no_such_run"], ["--resume"], "output_dir"),
    ("resume-without-checkpoint", DEMO, ["output_dir={held}"], ["--resume"], "output_dir"),
    ("damaged-metrics", DEMO, ["output_dir={damaged}"], ["--resume"], "metrics.jsonl"),
    ("resume-with-other-beta", DEMO, ["output_dir={other_beta}"], ["--resume"], "algorithm.beta"),
]


def _argv(files, config, overrides, flags, out):
    overrides = [o.format(**files) for o in overrides]
    if not any(o.startswith("output_dir=") for o in overrides):
        overrides.append(f"output_dir={out}")
    return ["run", "--dry-run", *flags, config.format(**files), *SMALL, *overrides]


@pytest.mark.parametrize("case,config,overrides,flags,names", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_clear_line(files, tmp_path, capsys, case, config, overrides, flags, names):
    out = tmp_path / "out"
    code = main(_argv(files, config, overrides, flags, out))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    ours = [line for line in err.splitlines() if line.startswith("onalign:")]
    assert code == 2 and len(ours) == 1 and ours[0].startswith("onalign: error: "), err
    assert names in ours[0], ours[0]
    assert not out.exists()  # nothing was created for a refused run


def test_corpus_is_large_enough():
    assert len(BAD) >= 40 and len({c[0] for c in BAD}) == len(BAD)


GOOD = [
    ("demo", []),
    ("jsonl-prompt-response", ["data.train={good}"]),
    ("trl-conversational", ["data.train={conv}"]),
    ("dataset-dict", ["data.train={dd}"]),
    ("dataset-dict-split", ["data.train={dd}", "data.split=test", "data.eval={good}"]),
    ("remote-reward", ["reward.kind=remote", "reward.url={score_url}"]),  # called once by the checks
    ("spin-with-targets", ["data.train={good}", "algorithm.name=spin", "rollout.n_samples=1"]),
]


@pytest.mark.parametrize("overrides", [g[1] for g in GOOD], ids=[g[0] for g in GOOD])
def test_valid_input_passes_the_dry_run_and_writes_nothing(files, tmp_path, capsys, overrides):
    out = tmp_path / "out"
    assert main(_argv(files, DEMO, overrides, [], out)) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "checked: model" in printed and "resource plan:" in printed and "fits the cluster" in printed
    assert not out.exists()


def test_dry_run_leaves_an_existing_run_untouched(files, tmp_path, capsys):
    """A dry run of a resume reads the run (it would refuse a damaged one) and changes no file of it."""
    run = tmp_path / "run"
    shutil.copytree(files["other_beta"], run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(_argv(files, DEMO, [f"output_dir={run}", "algorithm.beta=0.5"], ["--resume"], run)) == 0
    assert "resuming after iteration 1" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_hub_name_fails_at_once_without_network(files, tmp_path, capsys, monkeypatch):
    """Not offline, but no Hub to reach: one try, one line naming model.path (no minute of retries)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t = time.monotonic()
    assert main(_argv(files, DEMO, ["model.path=models/mine"], [], tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - t < 15
    assert "model.path 'models/mine' is not a directory" in err and "the Hub cannot be reached" in err
    assert "Traceback" not in err


def test_timeout_while_starting_actors_names_call_timeout(files, tmp_path, capsys, monkeypatch):
    """A raw GetTimeoutError from a wait at start-up becomes one line naming call_timeout_s."""
    import ray

    import pipeline.driver

    def stall(cfg):
        raise ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready.")

    monkeypatch.setattr(pipeline.driver, "run", stall)
    assert main(["run", DEMO, *SMALL, f"output_dir={tmp_path / 'out'}", "call_timeout_s=5"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("onalign: error: ") and "call_timeout_s" in err


def test_loop_timeouts_say_what_to_raise_and_what_is_saved(tmp_path, monkeypatch):
    """Loop.get: a call past call_timeout_s, or a collective that timed out inside a trainer, names
    call_timeout_s and says truthfully whether any iteration is saved."""
    from types import SimpleNamespace

    import ray

    from pipeline.loop import Loop, PipelineError
    from pipeline.rundir import RunDir

    loop = SimpleNamespace(cfg=SimpleNamespace(call_timeout_s=5.0), rundir=RunDir(tmp_path))
    loop.stopped = lambda problem, fix: Loop.stopped(loop, problem, fix)

    def raising(error):
        def get(refs, timeout=None):
            raise error

        return get

    monkeypatch.setattr(ray, "get", raising(ray.exceptions.GetTimeoutError()))
    with pytest.raises(PipelineError, match=r"trainer setup did not answer within call_timeout_s=5s\. No iteration"):
        Loop.get(loop, [], "trainer setup")
    state = tmp_path / "checkpoints" / "iter_2" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text("{}")
    dist = RuntimeError("[gloo] Timed out waiting 5000ms for recv operation to complete")
    monkeypatch.setattr(ray, "get", raising(ray.exceptions.RayTaskError("train", "tb", dist)))
    with pytest.raises(PipelineError, match=r"training timed out inside an actor .* Iterations up to 2 are saved"):
        Loop.get(loop, [], "training")


REAL = [
    ("model-without-chat-template", ["model.path={nochat}"], "chat template"),
    ("relative-model-path", ["model.path=models/mine"], "model.path"),
    ("negative-seed-with-data", ["seed=-1", "data.train={good}"], "seed"),
    ("reward-file-syntax-error", ["reward.function={broken_reward}:score"], "broken_reward.py"),
    ("conversational-prompt-ends-with-answer", ["data.train={ends_assistant}"], "ends_assistant.jsonl"),
]


@pytest.mark.parametrize("overrides,names", [r[1:] for r in REAL], ids=[r[0] for r in REAL])
def test_a_real_run_makes_the_same_checks_before_ray(files, tmp_path, capsys, overrides, names):
    argv = ["run", DEMO, *SMALL, f"output_dir={tmp_path / 'out'}", *(o.format(**files) for o in overrides)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("onalign:")]
    assert "Traceback" not in err and len(ours) == 1 and names in ours[0], err
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_overrides_may_follow_the_flags(tmp_path, capsys):
    """`onalign run CONFIG --dry-run key=value`: argparse refused the override after the flag."""
    from pipeline.cli import main

    code = main(["run", "configs/demo-cpu.yaml", "--dry-run", f"output_dir={tmp_path / 'o'}", "iterations=2"])
    assert code == 0 and "resource plan" in capsys.readouterr().out


def test_a_reward_module_that_fails_on_import_is_named(tmp_path):
    from common.errors import RewardError
    from rewards.scorers import load_function

    bad = tmp_path / "opens_missing.py"
    bad.write_text("open('/nonexistent/table.csv')\n\ndef score(p, r, refs):\n    return [0.0] * len(r)\n")
    with pytest.raises(RewardError, match="opens_missing.py:score': importing the module .*failed.*No such file"):
        load_function(f"{bad}:score")


@pytest.mark.parametrize("offline", ["1", "0"])
def test_a_data_path_typo_is_named_at_once(files, tmp_path, capsys, monkeypatch, offline):
    """`data.train=data/train` (no such file or directory here) is taken for a Hub dataset: it was retried
    five times (35 s) and ended with 'is not cached in None'. Now one line, at once, that says it is no local
    path first, with HF_HUB_OFFLINE set or with a Hub that cannot be reached."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline == "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    cfg = str(Path(DEMO).resolve())
    monkeypatch.chdir(tmp_path)
    t = time.monotonic()
    assert main(["run", cfg, "data.train=data/train", f"output_dir={tmp_path / 'out'}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - t < 15
    assert "data.train 'data/train' is no file or directory (relative to" in err, err
    assert ("HF_HUB_OFFLINE is set" in err) if offline == "1" else ("the Hub cannot be reached" in err), err
    assert "Traceback" not in err
