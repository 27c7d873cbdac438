"""Property: for any output situation and any writer, moreft changes only its own files, or nothing.

Situations: missing, empty, our earlier output, another kind's output, a foreign folder, a file,
links (to an empty folder, to our output, to a foreign folder, to nothing), a path under a file,
the run being read, a folder inside it, its adapter, and a folder holding it. Writers:
``save_adapter``, ``export_lora``, ``moreft export-lora``, ``moreft merge --overwrite``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_writes import adapted, bert, cli, copy_run, trained_run, tree  # noqa: F401 - fixtures

import moreft
from moreft.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from moreft.errors import MoreftError

pytestmark = pytest.mark.usefixtures("one_thread")


# -- property: any output situation, any writer --------------------------------------------------------
def _situations(
    root: Path, run: Path, own: Callable[[Path], None], other: Callable[[Path], None], extra: str, data: bytes
) -> dict[str, Callable[[], tuple[Path, bool]]]:
    """Setups by name -> (OUT, whether a library writer may succeed there)."""

    def mk(path: Path, files: dict[str, bytes] = {}) -> Path:  # noqa: B006 - read only
        path.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (path / name).write_bytes(content)
        return path

    def link(name: str, target: Path) -> Path:
        (root / name).symlink_to(target)
        return root / name

    return {
        "missing": (lambda: (root / "out", True)),
        "missing-parents": (lambda: (root / "a" / "b" / "out", True)),
        "empty": (lambda: (mk(root / "out"), True)),
        "ours": (lambda: (own(root / "out") or root / "out", True)),
        "other-kind": (lambda: (other(root / "out") or root / "out", False)),
        "foreign": (lambda: (mk(root / "out", {extra: data, CONFIG_NAME: data}), False)),
        "file": (lambda: ((root / "out").write_bytes(data) and root / "out", False)),
        "link-to-empty": (lambda: (link("out", mk(root / "real")), True)),
        "link-to-ours": (lambda: (own(root / "real") or link("out", root / "real"), True)),
        "link-to-foreign": (lambda: (link("out", mk(root / "real", {extra: data})), False)),
        "dangling-link": (lambda: (link("out", root / "nowhere"), False)),
        "under-a-file": (lambda: ((root / "f").write_bytes(data) and root / "f" / "out", False)),
        "run": (lambda: (run, False)),
        "run-subfolder": (lambda: (run / "out", True)),
        "run-adapter": (lambda: (run / "adapter", False)),
        "run-parent": (lambda: (root, False)),
    }


WRITERS = {  # name -> (is a CLI command, names its output may hold (None: per its marker))
    "save_adapter": (False, {CONFIG_NAME, WEIGHTS_NAME}),
    "export_lora": (False, {CONFIG_NAME, WEIGHTS_NAME}),
    "export-lora": (True, {CONFIG_NAME, WEIGHTS_NAME}),
    "merge": (True, None),
}
SITUATIONS = [
    "missing",
    "missing-parents",
    "empty",
    "ours",
    "other-kind",
    "foreign",
    "file",
    "link-to-empty",
    "link-to-ours",
    "link-to-foreign",
    "dangling-link",
    "under-a-file",
    "run",
    "run-subfolder",
    "run-adapter",
    "run-parent",
]


@pytest.mark.parametrize("situation", SITUATIONS)
@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    writer=st.sampled_from(sorted(WRITERS)),
    extra=st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,15}", fullmatch=True).filter(
        lambda n: n not in (CONFIG_NAME, WEIGHTS_NAME, "moreft_merged.json")
    ),
    data=st.binary(min_size=1, max_size=64),
)
def test_any_output_path_changes_only_our_files_or_nothing(trained_run, writer, situation, extra, data):  # noqa: F811 - the fixture
    model = adapted()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = copy_run(trained_run, root, "run")
        is_cli, names = WRITERS[writer]

        def write(out: Path) -> tuple[int, str]:
            if is_cli:
                return cli(writer, run, out, *(["--overwrite"] if writer == "merge" else []))
            try:
                (moreft.save_adapter if writer == "save_adapter" else moreft.export_lora)(model, out)
            except MoreftError as exc:
                return 2, f"moreft: error: {exc}"
            return 0, ""

        def own(out: Path) -> None:
            assert write(out)[0] == 0

        def other(out: Path) -> None:
            (moreft.export_lora if writer in ("save_adapter", "merge") else moreft.save_adapter)(model, out)

        out, lib_may_write = _situations(root, run, own, other, extra, data)[situation]()
        may_write = lib_may_write and not (is_cli and situation.startswith("run"))
        may_write |= situation == "run-adapter" and writer == "save_adapter"  # a moreft adapter: ours
        before = tree(root)
        code, err = write(out)
        after = tree(root)
        if not may_write:
            assert code == 2 and err.startswith("moreft: error: "), (situation, err)
            assert "Traceback" not in err
            assert after == before, situation
            return
        assert code == 0, (situation, err)
        real = Path(os.path.realpath(out)).relative_to(root.resolve())
        inside = {k for k in after if Path(k).parent == real}
        for key, value in before.items():
            if key not in inside:
                assert after.get(key) == value, (situation, key)  # nothing else changed; links stay links
        allowed = names or set(json.loads((root / real / "moreft_merged.json").read_text())["files"]) | {
            "moreft_merged.json"
        }
        assert {Path(k).name for k in inside} <= allowed and all(after[k][0] == "file" for k in inside)
        new = set(after) - set(before) - inside
        assert all(after[k] == ("dir",) and str(real).startswith(k) for k in new), new  # only OUT's parents
        assert not [k for k in after if ".tmp-" in k or ".old-" in k]  # no temp siblings left
