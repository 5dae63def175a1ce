"""The run's configuration: --config files, the resolved config.toml a run writes (round trip),
one-line errors naming the flag for bad values, and --resume refusing another configuration."""

from __future__ import annotations

import pytest

from trainer.config import RunConfig, dump_toml, load_toml
from trainer.run import main, parse_args

FAST = ["--recipe", "stage1", "--steps", "2", "--window", "32", "--set", "*.seq_len=384", "--no-progress",
        "--no-tensorboard", "--eval-samples", "0", "--eval-every", "0"]  # fmt: skip


def test_no_flags_give_the_run_config_defaults():
    assert parse_args([]) == RunConfig()


def test_config_file_and_round_trip(tmp_path):
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text(
        'recipe = "stage1"\nsteps = 7\nset = ["*.seq_len=384"]\nno-progress = true\nprofile-steps = "2:3"\n'
        'out = "runs/x"\nparallel = "dp=2"\npg_timeout = 30.0\n'
    )
    cfg = parse_args(["--config", str(cfg_file), "--steps", "9", "--set", "stage1.lr_max=1e-3"])
    assert (cfg.recipe, cfg.steps, cfg.progress, cfg.profile_steps) == ("stage1", 9, False, (2, 3))
    assert cfg.overrides == ["*.seq_len=384", "stage1.lr_max=1e-3"], "file first, flags after"
    assert (str(cfg.out), cfg.parallel, cfg.pg_timeout) == ("runs/x", "dp=2", 30.0)
    assert parse_args(["--config", str(cfg_file)]).overrides == ["*.seq_len=384"], (
        "the file's list is not mutated"
    )

    dumped = tmp_path / "config.toml"
    dumped.write_text(dump_toml(cfg))
    again = parse_args(["--config", str(dumped)])
    assert again == cfg
    assert RunConfig(**{**vars(RunConfig()), **load_toml(dumped)}) == cfg


def test_run_writes_its_config_and_refuses_another_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FAST, "--out", str(out)]) == 0
    capsys.readouterr()
    written = parse_args(["--config", str(out / "config.toml")])
    assert (written.recipe, written.steps, written.out) == ("stage1", 2, out)
    assert main([*FAST, "--out", str(out), "--resume", "--seed", "3", "--set", "stage1.lr_max=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume: this run differs from the one that wrote")
    assert "seed 0 -> 3" in err[0] and "stage1.lr_max" in err[0]
    assert parse_args(["--config", str(out / "config.toml")]) == written, "a refused resume leaves it alone"
    assert main(["--config", str(out / "config.toml"), "--resume"]) == 0, "its own config.toml resumes it"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ckpt-every", "0"], "error: --ckpt-every: expected an integer >= 1, got 0"),
        (["--steps", "0"], "error: --steps: expected an integer >= 1, got 0"),
        (["--keep", "0"], "error: --keep: expected an integer >= 1, got 0"),
        (["--window", "-1"], "error: --window: expected an integer >= 1, got -1"),
        (["--eval-every", "-5"], "error: --eval-every: expected an integer >= 0, got -5"),
        (["--pg-timeout", "0"], "error: --pg-timeout: expected seconds > 0, got 0.0"),
        (["--device", "gpu"], "error: --device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["--device", "cuda"], "error: --device cuda: no CUDA GPU is available here; use --device cpu"),
        (
            ["--set", "stage1.lr_max=abc"],
            "error: override 'stage1.lr_max=abc': lr_max expects a number, got 'abc'",
        ),
    ],
)
def test_bad_values_are_one_line_naming_the_flag(tmp_path, capsys, args, message):
    if args[:2] == ["--device", "cuda"]:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    assert main([*args, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]
    assert not (tmp_path / "run" / "log.jsonl").exists()
