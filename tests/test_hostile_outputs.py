"""Careless hands on output directories, interrupts and filesystem faults: kiln replaces only what it wrote itself,
never the current directory or an input, cleans up after itself (SIGTERM, kill -9 of an earlier run) and reports every
failure in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.checkpoint.output_guard import MARKER
from kiln.cli import main as cli_main
from kiln.cli.main import main as kiln_main

REPO = Path(__file__).resolve().parents[1]
BUILD = ["--max_input_len", "16", "--max_seq_len", "32", "--no_tune"]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A tiny checkpoint and its engine, made once; tests copy them."""
    root = tmp_path_factory.mktemp("made")
    assert kiln_main(["convert", "--preset", "dbrx-tiny", "--dtype", "float32", "--output_dir", str(root / "c")]) == 0
    assert kiln_main(["build", "--checkpoint_dir", str(root / "c"), "--output_dir", str(root / "e"), *BUILD]) == 0
    return root


@pytest.fixture()
def ckpt(tmp_path, made) -> Path:
    return Path(shutil.copytree(made / "c", tmp_path / "c"))


@pytest.fixture()
def engine(tmp_path, made) -> Path:
    return Path(shutil.copytree(made / "e", tmp_path / "e"))


def one_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kiln ")]
    assert len(lines) == 1 and lines[0].startswith(f"kiln {command}: ") and "Traceback" not in err, err
    return lines[0]


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_build_over_engine_holding_a_user_file_refuses_and_keeps_it(tmp_path, ckpt, engine, capsys):
    (engine / "results.json").write_text('{"mine": 1}')
    before = snapshot(engine)
    assert kiln_main(["build", "--checkpoint_dir", str(ckpt), "--output_dir", str(engine), *BUILD]) == 2
    assert one_error(capsys, "build") == (
        f"kiln build: error: output directory {engine} holds files kiln did not write (results.json); kiln replaces "
        "only its own checkpoints and engines: move them or choose another --output_dir")
    assert snapshot(engine) == before and leftovers(tmp_path) == []
    (engine / "results.json").unlink()  # kiln's own files alone: replaced
    assert kiln_main(["build", "--checkpoint_dir", str(ckpt), "--output_dir", str(engine), *BUILD]) == 0


def test_convert_over_checkpoint_holding_user_files_refuses(tmp_path, ckpt, capsys):
    (ckpt / "notes.txt").write_text("keep")
    (ckpt / "sub").mkdir()
    assert kiln_main(["convert", "--preset", "dbrx-tiny", "--output_dir", str(ckpt)]) == 2
    assert "holds files kiln did not write (notes.txt, sub)" in one_error(capsys, "convert")
    assert (ckpt / "notes.txt").read_text() == "keep" and leftovers(tmp_path) == []


@pytest.mark.parametrize("target", [".", "..", "./"])
def test_output_dir_holding_the_current_directory_refused(tmp_path, monkeypatch, capsys, target):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert kiln_main(["convert", "--preset", "dbrx-tiny", "--output_dir", target]) == 2
    assert one_error(capsys, "convert") == (
        f"kiln convert: error: output directory {target.rstrip('/') or '.'} is the current directory or holds it, "
        "which kiln would have to replace; name a new subdirectory, e.g. --output_dir ./out")
    assert list(work.iterdir()) == [] and leftovers(tmp_path) == []


def test_output_dir_equal_to_the_input_refused(tmp_path, ckpt, capsys):
    before = snapshot(ckpt)
    assert kiln_main(["build", "--checkpoint_dir", str(ckpt), "--output_dir", str(ckpt), *BUILD]) == 2
    assert one_error(capsys, "build") == (
        f"kiln build: error: output directory {ckpt} is (or holds) the input {ckpt}; writing it would delete the "
        "input: choose another --output_dir")
    assert kiln_main(["build", "--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path), *BUILD]) == 2
    assert "is (or holds) the input" in one_error(capsys, "build")
    assert snapshot(ckpt) == before


def test_engine_weights_are_read_only_or_copied(tmp_path, ckpt):
    assert kiln_main(["build", "--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "e1"), *BUILD]) == 0
    linked, source = tmp_path / "e1" / "rank0.safetensors", ckpt / "rank0.safetensors"
    assert linked.stat().st_mode & 0o222 == 0 and source.stat().st_mode & 0o222 == 0
    assert kiln_main(["build", "--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "e2"), *BUILD,
                      "--copy_weights"]) == 0
    copied = tmp_path / "e2" / "rank0.safetensors"
    assert copied.stat().st_ino != source.stat().st_ino and copied.read_bytes() == source.read_bytes()
    assert copied.stat().st_mode & 0o222 == 0


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_memory_gib_nonsense_refused_before_writing(tmp_path, ckpt, capsys, value):
    assert kiln_main(["build", "--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "e"), *BUILD,
                      "--memory_gib", value]) == 2
    assert f"--memory_gib must be a positive number of GiB, got {float(value)}" in one_error(capsys, "build")
    assert not (tmp_path / "e").exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def marked(parent: Path, name: str, pid: int, marker: bool = True) -> Path:
    import socket

    path = parent / name
    path.mkdir()
    (path / "rank0.safetensors").write_bytes(b"x" * 10)
    if marker:
        (path / MARKER).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    return path


def test_stale_temp_dirs_of_dead_processes_only_are_cleaned(tmp_path):
    pid = dead_pid()
    stale = [marked(tmp_path, f".ckpt.tmp-{pid}", pid), marked(tmp_path, f".other.old-{pid}", pid)]
    kept = [marked(tmp_path, f".ckpt.tmp-{os.getppid()}", os.getppid()),  # a live process's
            marked(tmp_path, f".ckpt.tmp-{pid + 1}", pid + 1, marker=False),  # not provably kiln's
            marked(tmp_path, f".mine.tmp-{pid}", pid + 7)]  # marker disagrees with the name
    assert kiln_main(["convert", "--preset", "dbrx-tiny", "--output_dir", str(tmp_path / "ckpt")]) == 0
    assert not any(p.exists() for p in stale)
    assert all((p / "rank0.safetensors").exists() for p in kept)


def convert_process(out: Path, env_extra: dict[str, str] | None = None, preexec=None) -> subprocess.Popen:
    """`python -m kiln convert` of a dummy model big enough (~40 MB) to be caught writing."""
    config = out.parent / "big.json"
    from fixtures_dbrx import dbrx_published_config

    config.write_text(json.dumps(dbrx_published_config(d_model=256, n_heads=4, n_layers=24,
                                                       ffn_config={"ffn_hidden_size": 256, "moe_num_experts": 8})))
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "kiln", "convert", "--config", str(config), "--output_dir",
                             str(out)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                            preexec_fn=preexec)


def wait_for_writing(parent: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not any((p / "rank0.safetensors").exists() for p in parent.glob(".ckpt.tmp-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "convert ended before it was caught writing"
        time.sleep(0.01)


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    proc = convert_process(tmp_path / "ckpt")
    wait_for_writing(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.strip().splitlines()[-1] == "kiln convert: terminated (SIGTERM); nothing half-written was left"
    assert leftovers(tmp_path) == [] and not (tmp_path / "ckpt").exists()


def test_kill_9_leaves_a_temp_dir_that_the_next_run_removes(tmp_path):
    proc = convert_process(tmp_path / "ckpt")
    wait_for_writing(tmp_path, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert leftovers(tmp_path) == [f".ckpt.tmp-{proc.pid}"]
    assert kiln_main(["convert", "--preset", "dbrx-tiny", "--output_dir", str(tmp_path / "other")]) == 0
    assert leftovers(tmp_path) == []


def test_file_size_limit_is_one_line(tmp_path):
    import resource

    proc = convert_process(tmp_path / "ckpt", preexec=lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                                                                  (1 << 20, 1 << 20)))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith("kiln convert: error: ")
    assert "exceeds the size limit" in err and "Traceback" not in err
    assert leftovers(tmp_path) == [] and not (tmp_path / "ckpt").exists()


@pytest.fixture()
def small_mount(tmp_path):
    """A 2 MB tmpfs (needs root and mount; skipped otherwise)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs mounts to make a full or read-only filesystem")
    yield mount
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], check=False)  # never leave a mount behind


def test_full_disk_refused_up_front(small_mount, capsys):
    config = small_mount.parent / "mid.json"
    from fixtures_dbrx import dbrx_published_config

    config.write_text(json.dumps(dbrx_published_config(d_model=256, n_layers=8)))
    assert kiln_main(["convert", "--config", str(config), "--output_dir", str(small_mount / "ckpt")]) == 2
    line = one_error(capsys, "convert")
    assert "this checkpoint needs 0.0" in line and f"and {small_mount} has 0.0 GB free" in line
    assert list(small_mount.iterdir()) == []


def test_disk_filling_during_the_write_is_one_line(small_mount, monkeypatch, capsys):
    import shutil as shutil_module

    from kiln.checkpoint import safety

    # Another process takes the space after the up-front check: pretend the check saw plenty.
    usage = shutil_module.disk_usage(small_mount)
    monkeypatch.setattr(safety.shutil, "disk_usage", lambda p: usage._replace(free=1 << 40))
    config = small_mount.parent / "mid.json"
    from fixtures_dbrx import dbrx_published_config

    config.write_text(json.dumps(dbrx_published_config(d_model=256, n_layers=8)))
    assert kiln_main(["convert", "--config", str(config), "--output_dir", str(small_mount / "ckpt")]) == 2
    line = one_error(capsys, "convert")
    assert line.startswith(f"kiln convert: error: cannot use {small_mount}/.ckpt.tmp-") and line.endswith(
        "/rank0.safetensors: the disk is full; free space or write elsewhere")
    assert list(small_mount.iterdir()) == []


def test_read_only_filesystem_is_one_line(small_mount, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    assert kiln_main(["convert", "--preset", "dbrx-tiny", "--output_dir", str(small_mount / "ckpt")]) == 2
    assert one_error(capsys, "convert").endswith(": the filesystem is read-only; write elsewhere")


def test_catch_all_turns_a_bug_into_one_line(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something deep\nover two lines")

    monkeypatch.setattr(cli_main.COMMANDS["convert"], "main", broken)
    monkeypatch.delenv("KILN_DEBUG", raising=False)
    assert kiln_main(["convert", "--preset", "dbrx-tiny"]) == 1
    assert one_error(capsys, "convert") == (
        "kiln convert: internal error: RuntimeError: something deep over two lines (a bug in kiln; run with "
        "KILN_DEBUG=1 or --debug for the traceback)")
    assert kiln_main(["--debug", "convert", "--preset", "dbrx-tiny"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    monkeypatch.setenv("KILN_DEBUG", "1")
    assert kiln_main(["convert", "--preset", "dbrx-tiny"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
