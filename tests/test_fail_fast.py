"""Fail fast: a wrong key, value, path or setting is one ``clip-train: error:`` line, before any model."""
import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from dist_harness import free_port
from project_paths import DEMO_CONFIG

from clip_train.engine.faults import describe_failure


# ``clip-train`` with a tripwire: building a model first creates the marker file (argv[1]), then builds it.
WITH_TRIPWIRE = """
import runpy, sys
import clip_train.models as models
marker, real_build = sys.argv.pop(1), models.build_model
def build_model(*args, **kwargs):
    open(marker, "w").close()
    return real_build(*args, **kwargs)
models.build_model = build_model
runpy.run_module("clip_train.cli", run_name="__main__", alter_sys=True)
"""


# ``clip-train`` that creates the marker file (argv[1]) at exit if it imported torch (a config error needs none).
WITH_TORCH_PROBE = """
import atexit, runpy, sys
marker = sys.argv.pop(1)
atexit.register(lambda: "torch" in sys.modules and open(marker, "w").close())
runpy.run_module("clip_train.cli", run_name="__main__", alter_sys=True)
"""


def clip_train(*args: str, cwd=None, env=None, probe=WITH_TRIPWIRE) -> tuple[int, str, bool]:
    """Exit code, stderr, and whether the probe fired (by default: a model was built)."""
    marker = os.path.join(tempfile.gettempdir(), f"clip-train-probe-{os.getpid()}-{time.monotonic_ns()}")
    proc = subprocess.run([sys.executable, "-c", probe, marker, "--config", os.path.abspath(DEMO_CONFIG),
                           *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    built = os.path.exists(marker)
    if built:
        os.remove(marker)
    return proc.returncode, proc.stderr, built


def base_args(demo, run):
    return [f"data.train={demo}/train", f"eval.zeroshot={demo}/test", f"eval.retrieval={demo}/retrieval",
            f"output_dir={run}", "data.workers=0"]


@pytest.mark.parametrize("override, expected", [
    ("optim.lrr=1e-3", "unknown config key 'optim.lrr'; valid keys under optim: lr,"),
    ("optim.lr=-1", "optim.lr must be positive"),
    ("train.max_steps=5", "unknown config key 'train.max_steps'"),  # the contract's name is train.steps
    ("ds.zero_stage=4", "ds.zero_stage=4: use 0, 1, 2 or 3"),
])
def test_a_key_typo_or_bad_value_fails_in_seconds(tmp_path, override, expected):
    code, err, imported_torch = clip_train(f"output_dir={tmp_path / 'run'}", override, probe=WITH_TORCH_PROBE)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("clip-train: error: ") and expected in err, err
    assert not imported_torch  # the config is checked before the ~10 s of imports


@pytest.mark.parametrize("override, named", [
    ("eval.zeroshot=/nowhere/test", "eval.zeroshot='/nowhere/test': dataset not found: /nowhere/test"),
    ("eval.retrieval=/nowhere/retrieval", "eval.retrieval='/nowhere/retrieval': dataset not found"),
    ("data.train=/elsewhere/train", "data.train='/elsewhere/train'"),
    ("model.pretrained=/nowhere/weights.safetensors", "model.pretrained: weights file not found: /nowhere/weights"),
    ("ds.config_file=/nowhere/ds.json", "ds.config_file not found: /nowhere/ds.json"),
    ("model.name=/nowhere/model.json", "model config file not found: /nowhere/model.json"),
    ("ds.precision=fp16", "ds.precision=fp16: DeepSpeed does not run fp16 on this CPU"),
    ("eval.zeroshot=", "eval.every=5 evaluates eval.zeroshot and eval.suite, neither of which is set"),
    ("eval.suite=/nowhere/suite.yaml", "eval.suite='/nowhere/suite.yaml': suite file not found: /nowhere/suite.yaml"),
])
def test_a_wrong_path_or_setting_fails_before_training(demo_dataset, tmp_path, override, named):
    if "fp16" in override and torch.cuda.is_available():
        pytest.skip("fp16 runs on a GPU")
    code, err, model_built = clip_train(*base_args(demo_dataset, tmp_path / "run"), "eval.every=5", override)
    assert code == 2 and len(err.strip().splitlines()) == 1 and named in err, err
    assert not model_built and not (tmp_path / "run").exists()  # nothing was started


def test_an_eval_suite_dataset_is_checked_before_training(demo_dataset, tmp_path):
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(f"dataset_root: {demo_dataset}/{{dataset}}\ndatasets: [test, imagenet2k]\n")
    code, err, model_built = clip_train(*base_args(demo_dataset, tmp_path / "run"), f"eval.suite={suite_file}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "eval.suite=" in err and "unknown dataset 'imagenet2k'" in err and "imagenet1k" in err
    assert not model_built and not (tmp_path / "run").exists()


def test_a_missing_resume_target_fails_before_training(demo_dataset, tmp_path):
    code, err, model_built = clip_train(*base_args(demo_dataset, tmp_path / "run"), "--resume", "latest")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--resume latest: no checkpoint to resume in" in err
    assert not model_built
    code, err, model_built = clip_train(*base_args(demo_dataset, tmp_path / "run"), "--resume", str(tmp_path / "step_1"))
    assert code == 2 and f"not a complete checkpoint directory (no model.json): {tmp_path / 'step_1'}" in err
    assert not model_built


def test_checkpoints_on_node_local_disks_are_refused_at_startup(demo_dataset, tmp_path):
    """Two ranks whose ``output_dir`` resolves to different directories (as on node-local disks)."""
    port, procs = free_port(), []
    for rank in range(2):
        cwd = tmp_path / f"node{rank}"
        cwd.mkdir()
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "clip_train.cli", "--config", os.path.abspath(DEMO_CONFIG),
             f"data.train={demo_dataset}/train", "eval.zeroshot=", "eval.retrieval=", "output_dir=runs/local",
             "data.workers=0"], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    for err in errors:
        assert err.strip().splitlines()[-1].startswith("clip-train: error: output_dir runs/local is not one directory "
                                                       "shared by all ranks: rank 1 on ")
        assert "checkpoints need a shared filesystem" in err


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("[gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:4711: Connection reset by peer"),
     "rank 3: a collective operation failed during train step 7 ([gloo/transport/tcp/pair.cc:534] Read error"),
    (RuntimeError("Timed out waiting 600000ms for recv operation to complete"),
     "rank 3: a collective operation failed during train step 7 (Timed out waiting 600000ms"),
    (RuntimeError("Input type (torch.FloatTensor) and weight type (CPUBFloat16Type) should be the same"),
     "rank 3: RuntimeError during train step 7: Input type (torch.FloatTensor) and weight type (CPUBFloat16Type)"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total; peer access)"),
     "rank 3: RuntimeError during train step 7: CUDA out of memory. Tried to allocate 2.00 GiB"),
    (KeyError("image"), "rank 3: KeyError during train step 7: 'image' (traceback in the log above)"),
])
def test_a_failure_is_named_for_what_it_is(error, expected):
    assert describe_failure(error, 3, "train step 7").startswith(expected)


def _img2dataset_copy(demo_dataset, target, with_stats):
    """The demo's train shards as img2dataset leaves them: no sizes.json; with_stats: a
    NAME_stats.json per shard with img2dataset's fields (`successes` = samples written)."""
    import json
    import shutil

    target.mkdir()
    sizes = json.loads((demo_dataset / "train" / "sizes.json").read_text())
    for name, count in sizes.items():
        shutil.copy(demo_dataset / "train" / name, target / name)
        if with_stats:
            stem = name.removesuffix(".tar")
            (target / f"{stem}_stats.json").write_text(json.dumps({
                "count": count + 3, "successes": count, "failed_to_download": 3, "failed_to_resize": 0,
                "duration": 1.5, "start_time": 0.0, "end_time": 1.5, "status_dict": {"success": count}}))
    return target, sum(sizes.values())


def test_img2dataset_output_is_sized_from_its_stats_files(demo_dataset, tmp_path):
    from clip_train.data.shards import count_samples, expand_shards

    shards, total = _img2dataset_copy(demo_dataset, tmp_path / "i2d", with_stats=True)
    assert count_samples(expand_shards(str(shards))) == total  # `successes`, not `count` (which counts failures)
    code, err, _ = clip_train(*base_args(demo_dataset, tmp_path / "run"), f"data.train={shards}", "train.steps=1",
                              "eval.zeroshot=", "eval.retrieval=", "data.batch_size=16", probe=WITH_TORCH_PROBE)
    assert code == 0, err


def test_shards_of_unknown_size_fail_before_training(demo_dataset, tmp_path):
    shards, _ = _img2dataset_copy(demo_dataset, tmp_path / "i2d", with_stats=False)
    code, err, model_built = clip_train(*base_args(demo_dataset, tmp_path / "run"), f"data.train={shards}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "00000.tar has no entry in a sizes.json beside it and no _stats.json" in err, err
    assert not model_built
