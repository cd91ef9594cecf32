"""``prefetcher pull`` as a user runs it: the console script against the real registry."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fixtures import images
from fixtures.registries import Registry

from tests.images.pulling import stored_blobs

#: The console script installed beside this interpreter (the venv's ``prefetcher``).
PREFETCHER = str(Path(sys.executable).with_name("prefetcher"))


def prefetcher(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PREFETCHER, *args], capture_output=True, text=True, timeout=120, env=env
    )


def skopeo_digest(ref: str) -> str:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    return str(json.loads(out.stdout)["Digest"])


def test_pull_prints_the_digest_skopeo_reports(registry: Registry, tmp_path: Path) -> None:
    image = images.Image(
        [images.layer({"a.txt": "a"}), images.random_layer(200_000, files=4, seed=21)]
    )
    images.push(registry, "cli/app", "1.4", image)
    ref = f"{registry.host}/cli/app:1.4"

    out = prefetcher("pull", ref, "--root", str(tmp_path / "store"), "--no-unpack")

    assert out.returncode == 0, out.stderr
    digest = skopeo_digest(ref)
    assert out.stdout.splitlines()[0] == f"{ref}: {digest}"
    assert "2 layers" in out.stdout
    assert stored_blobs(tmp_path / "store") == {b.digest for b in image.blobs} | {digest}
    # Piped stderr gets plain progress lines, not a terminal's bars.
    assert "Ready" in out.stderr and "\x1b[" not in out.stderr


def test_pull_json_prints_one_result_and_a_second_pull_downloads_nothing(
    registry: Registry, tmp_path: Path
) -> None:
    images.push(registry, "cli/json", "1", images.Image([images.random_layer(50_000, seed=22)]))
    ref = f"{registry.host}/cli/json:1"
    args = ["pull", ref, "--root", str(tmp_path), "--no-unpack", "--json"]
    first = json.loads(prefetcher(*args).stdout)
    second = json.loads(prefetcher(*args).stdout)
    assert first["digest"] == second["digest"] == skopeo_digest(ref)
    assert first["bytes_downloaded"] > 50_000
    assert second["bytes_downloaded"] == 0


def test_a_tampered_blob_fails_the_pull_naming_the_digest(
    registry: Registry, tmp_path: Path
) -> None:
    image = images.Image([images.random_layer(100_000, seed=23)])
    images.push(registry, "cli/tampered", "1", image)
    layer = image.layers[0]
    path = registry.blob_path(layer.digest)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))

    out = prefetcher(
        "pull", f"{registry.host}/cli/tampered:1", "--root", str(tmp_path), "--no-unpack"
    )

    assert out.returncode == 1
    assert layer.digest in out.stderr
    assert "Traceback" not in out.stderr
    assert layer.digest not in stored_blobs(tmp_path)


def test_expected_failures_are_one_line_with_a_non_zero_exit(tmp_path: Path) -> None:
    bad = prefetcher("pull", "UPPER/case", "--root", str(tmp_path))
    assert bad.returncode == 1
    assert "lowercase" in bad.stderr and "Traceback" not in bad.stderr
    bad_flag = prefetcher("pull", "x", "--root", str(tmp_path), "--progress-timeout", "5 min")
    assert bad_flag.returncode == 2 and "5 min" in bad_flag.stderr
    unreachable = prefetcher("pull", "127.0.0.1:9/app:1", "--root", str(tmp_path))
    assert unreachable.returncode == 1
    assert "127.0.0.1:9" in unreachable.stderr and "Traceback" not in unreachable.stderr


def test_a_stalled_pull_exits_non_zero_with_the_stall_reason(
    fault_proxy_factory: object, registry: Registry, tmp_path: Path
) -> None:
    image = images.Image([images.random_layer(200_000, seed=24)])
    images.push(registry, "cli/stall", "1", image)
    proxy = fault_proxy_factory(registry.url)  # type: ignore[operator]
    proxy.stall(f"/blobs/{image.layers[0].digest}", after=30_000)

    out = prefetcher(
        "pull", f"{proxy.host}/cli/stall:1", "--root", str(tmp_path), "--no-unpack",
        "--progress-timeout", "2s",
    )

    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"prefetcher: pull {proxy.host}/cli/stall:1 failed:")
    assert "stalled" in last and image.layers[0].digest in last
    assert "retry" in out.stderr.lower()  # the recovered stalls were shown as they happened


def pull_in_a_child(script: str, ref: str, store: Path) -> subprocess.CompletedProcess[str]:
    """``python -c SCRIPT pull REF --root STORE --quiet``, which must succeed."""
    out = subprocess.run(
        [sys.executable, "-c", script, "pull", ref, "--root", str(store), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out


def test_a_pull_loads_no_command_line_client_nor_kubernetes_code(
    registry: Registry, tmp_path: Path
) -> None:
    """Every module a pull imports is start-up time paid before its first request. httpx
    would import its own command-line client (click, pygments, rich's console: a tenth of
    a second cold) because those are installed; the Kubernetes clients belong to the
    operator and the agent."""
    images.push(registry, "cli/lean", "1", images.Image([images.layer({"a": "a"})]))
    script = (
        "import json, sys\n"
        "from agent.cli import main\n"
        "code = main.main(sys.argv[1:])\n"
        "print(json.dumps([code, sorted(sys.modules), sys.modules.get('httpx._main')]))\n"
    )
    out = pull_in_a_child(script, f"{registry.host}/cli/lean:1", tmp_path / "store")

    code, modules, httpx_cli = json.loads(out.stdout.splitlines()[-1])
    assert code == 0
    assert "httpx" in modules and httpx_cli is None
    tops = {name.split(".")[0] for name in modules}
    assert tops & {"click", "pygments", "kopf", "kubernetes", "aiohttp"} == set()
    assert "rich.console" not in modules  # piped: plain progress lines, no terminal bars


def console_pull_report(
    ref: str, store: Path, report: str, *, setup: str = "", loaded: str = ""
) -> Any:
    """``console()`` pulling ``ref`` into ``store`` in a child: ``setup`` (code) runs before
    the command modules load, ``loaded`` right after; at the exit (after the command, before
    the process ends) the child prints the expression ``report`` as JSON, returned here."""
    script = (
        "import atexit, gc, json, os, sys\n"
        f"{setup}"
        "sys.argv[0] = 'prefetcher'\n"
        "from agent.cli.main import console\n"
        f"{loaded}"
        f"atexit.register(lambda: print(json.dumps({report}), file=sys.stderr))\n"
        "console()\n"
    )
    out = pull_in_a_child(script, ref, store)
    return json.loads(out.stderr.strip().splitlines()[-1])


def test_the_start_up_does_not_collect_garbage_over_the_modules_it_loads(
    registry: Registry, tmp_path: Path
) -> None:
    """Loading the command modules makes tens of thousands of long-lived objects and no
    garbage to speak of: ``console()`` keeps the collector off while they load (before this,
    a dozen passes over them, a full one among them: 40-70 ms of every start), freezes them
    out of every later collection, and runs the command with the collector on."""
    images.push(registry, "cli/gc", "1", images.Image([images.layer({"a": "a"})]))
    report = console_pull_report(
        f"{registry.host}/cli/gc:1", tmp_path / "store",
        "{'passes': passes[before:], 'enabled': gc.isenabled(),"
        " 'frozen': gc.get_freeze_count()}",
        setup="passes = []  # (generation, objects frozen by then) of every collection\n"
        "gc.callbacks.append(lambda phase, info: phase == 'start' and passes.append(\n"
        "    (info['generation'], gc.get_freeze_count())))\n",
        loaded="before = len(passes)  # passes of the interpreter's own start-up\n",
    )  # fmt: skip

    assert report["enabled"] is True  # the pull ran with the collector on
    assert report["frozen"] > 10_000  # the modules' objects, out of its way
    # The pull collected its own garbage, and every pass came after the freeze: none while
    # the modules loaded.
    assert report["passes"], "no collection at all during the pull"
    assert all(frozen > 0 for _, frozen in report["passes"]), report["passes"]


def test_the_start_up_does_not_look_for_pydantic_plugins(
    registry: Registry, tmp_path: Path
) -> None:
    """pydantic looks for plugins in the entry points of every installed distribution when
    it builds its first model; the prefetcher has none, and ``console()`` says so, so no
    start reads a hundred distributions' metadata (with a cold page cache, tens of
    milliseconds before the first request). A setting of the caller's own is kept."""
    images.push(registry, "cli/plugins", "1", images.Image([images.layer({"a": "a"})]))
    ref = f"{registry.host}/cli/plugins:1"
    looked = (
        "{'looked': __import__('pydantic.plugin._loader', fromlist=['_'])._plugins"
        " is not None, 'setting': os.environ.get('PYDANTIC_DISABLE_PLUGINS')}"
    )
    assert console_pull_report(ref, tmp_path / "store", looked) == {
        "looked": False, "setting": "__all__",
    }  # fmt: skip
    kept = console_pull_report(
        ref, tmp_path / "store2", looked,
        setup="os.environ['PYDANTIC_DISABLE_PLUGINS'] = 'logfire'\n",
    )  # fmt: skip
    assert kept == {"looked": True, "setting": "logfire"}  # looked, skipping the one named


def test_main_called_in_a_process_leaves_its_collector_alone() -> None:
    """Only ``console()`` (a process of its own) freezes: code that calls ``main()`` — a test,
    an embedding program — keeps its collector as it was."""
    from agent.cli import main

    before = (gc.isenabled(), gc.get_freeze_count())
    with pytest.raises(SystemExit):
        main.main(["--version"])
    assert (gc.isenabled(), gc.get_freeze_count()) == before
