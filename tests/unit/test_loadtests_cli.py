"""The one command of the load tests (loadtests/cli.py): every scenario behind
`python -m loadtests`, shared flags and derived help defaults, the older
`python -m loadtests.<scenario>` form, and the typed head of every record."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from loadtests import cli, coldload, memory, scale
from loadtests.bench import publish
from loadtests.record import BENCH_FORMAT, BenchRecord, RecordHead, RunRecord

ROOT = Path(__file__).resolve().parents[2]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    return cli.build_parser(cli.scenarios())[1]


def test_every_scenario_is_one_subcommand() -> None:
    known = cli.scenarios()
    assert list(known) == [*cli.SCENARIOS, "report"]
    out = subprocess.run(
        [sys.executable, "-m", "loadtests", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in [*known, "micro"]:
        assert re.search(rf"^\s+{name}\b", out, re.MULTILINE), name


@pytest.mark.parametrize("name", [*cli.SCENARIOS, "report"])
def test_help_of_each_scenario(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    assert f"usage: python -m loadtests {name}" in capsys.readouterr().out


def test_shared_flags_are_defined_once_with_scenario_defaults() -> None:
    subs = _subparsers()
    assert coldload.parse_args([]).nice == 19
    assert scale.parse_args([]).out == Path("build/scale")
    assert cli.parse_args(["run"])[1].nice == 10
    assert cli.parse_args(["exposures"])[1].nice == 0  # as started: it never reniced
    assert cli.parse_args(["report", "r.json"])[1].out is None
    # One definition: the same help text in every scenario, its default its own.
    helps = {
        name: next(a.help for a in sub._actions if "--nice" in a.option_strings)
        for name, sub in subs.items()
    }
    assert len(set(helps.values())) == 1
    assert not any("--home" in a.option_strings for a in subs["run"]._actions)
    assert any("--home" in a.option_strings for a in subs["compare"]._actions)


def test_help_defaults_are_derived_not_written() -> None:
    """A default written by hand in a help text goes stale when the default changes:
    the formatter adds every default, so no help text states a number of its own."""
    for name, sub in _subparsers().items():
        for action in sub._actions:
            assert not re.search(r"\[-?[\d.,]+\]", action.help or ""), (name, action.help)
        text = sub.format_help()
        for action in sub._actions:
            text_ = action.help or ""
            computed = text_.endswith("]") and "%(default)" not in text_  # "[all cores]"
            if (
                action.option_strings
                and isinstance(action.default, (int, float))
                and not isinstance(action.default, bool)
                and not computed
            ):
                assert f"[{action.default}]" in " ".join(text.split()), (name, action.dest)


def test_checks_report_through_the_scenario_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(["memory", "--systems", "ours,nope"])
    assert "usage: python -m loadtests memory" in capsys.readouterr().err
    args = cli.parse_args(["memory", "--systems", "ours,vllm-fix"])[1]
    assert args.systems == ["ours", "vllm-fix"]
    assert "scenario" not in vars(args)  # not part of the recorded config
    assert memory.SCENARIO.check is not None


def test_the_older_module_form_delegates(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "loadtests.scale", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("usage: python -m loadtests scale")
    assert "--register-concurrency" in out


def test_micro_benchmarks_keep_their_own_parsers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["micro", "nope"])
    assert "micro {engine,lora-ops}" in str(exc.value.code)
    assert set(cli.MICRO.values()) == {
        p.stem for p in (ROOT / "loadtests" / "micro").glob("bench_*.py")
    }


def test_bench_record_head_is_typed_and_flat(tmp_path: Path) -> None:
    args = argparse.Namespace(out=Path("build/x"), counts=[1, 2], nice=19)
    record = BenchRecord.start("scale", "python -m loadtests scale", args)
    record.body["points"] = [{"registered": 1}]
    data = record.to_dict()
    assert list(data)[:6] == ["created", "command", "host", "config", "format", "scenario"]
    assert data["format"] == BENCH_FORMAT and data["scenario"] == "scale"
    assert data["config"] == {"out": "build/x", "counts": [1, 2], "nice": 19}
    assert data["points"] == [{"registered": 1}]
    assert {"cpu", "cores"} <= set(data["host"])
    json.dumps(data)
    record.body["host"] = {}
    with pytest.raises(ValueError, match="host"):
        record.to_dict()
    # The load runs share the head.
    run = RunRecord(**RecordHead.fields_now("python -m loadtests run", args))
    assert isinstance(run, RecordHead) and run.config == data["config"]


def test_committed_results_stay_out_of_the_wheel(tmp_path: Path) -> None:
    """loadtests/results/ is the repository's, not the installed package's: even a build
    whose file finder picks up every file under loadtests/ (here MANIFEST.in's graft; an
    SCM plugin does the same) leaves it out, and keeps every module."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    for name in ("server", "adapters_registry", "clients", "loadtests"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    (src / "MANIFEST.in").write_text("graft loadtests\n")
    assert any((src / "loadtests" / "results").rglob("*.json"))
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*pip, str(src), "-w", str(tmp_path / "dist")],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("loadtests/results")]
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "loadtests").rglob("*.py")}
    assert modules <= set(names)


def test_publish_writes_the_record_and_its_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(out=tmp_path)
    record = BenchRecord.start("coldload", "python -m loadtests coldload", args)
    record.body["rank"] = 16
    md = publish(record, tmp_path, lambda data: f"# {data['scenario']} rank {data['rank']}\n\n")
    assert md == tmp_path / "coldload.md" and md.read_text() == "# coldload rank 16\n"
    data = json.loads((tmp_path / "coldload.json").read_text())
    assert data["format"] == BENCH_FORMAT and data["rank"] == 16
    assert data["config"] == {"out": str(tmp_path)}
    assert "# coldload rank 16" in capsys.readouterr().out
