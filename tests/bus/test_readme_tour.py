"""The README's tour of the code stays true: every folder and file it names exists,
every package of ours is in it, and its layers are the ones import-linter enforces."""

from __future__ import annotations

import re
import tomllib

from tests.conftest import PROJECT

README = (PROJECT / "README.md").read_text()
TOUR = README[README.index("## How it fits together") : README.index("Guarantees and where they come from:")]
NAMED = re.compile(r"`([\w.-]+(?:/[\w.-]*)*(?:/|\.py|\.json|\.md|\.sql|\.html))`")
DIAGRAM_PATH = re.compile(r"\b((?:[a-z_]+/)+[a-z_]+\.py)\b")


def _rows() -> list[tuple[str, str, str]]:
    rows = []
    for line in TOUR.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`") and cells[1].endswith("/`"):
            rows.append((cells[0], cells[1].strip("`"), cells[2]))
    return rows


def _exists(folder: str, name: str) -> bool:
    return (PROJECT / folder / name).exists() or ("/" in name.rstrip("/") and (PROJECT / name).exists())


def test_every_folder_and_file_the_tour_names_exists() -> None:
    rows = _rows()
    assert len(rows) >= 8, "the tour's table of layers is missing"
    missing = [
        f"{folder}{name}"
        for _, folder, what in rows
        for name in NAMED.findall(what)
        if not _exists(folder, name)
    ]
    missing += [folder for _, folder, _ in rows if not (PROJECT / folder).is_dir()]
    diagram = TOUR[: TOUR.index("| layer |")]
    missing += [path for path in DIAGRAM_PATH.findall(diagram) if not (PROJECT / path).exists()]
    assert not missing, f"the README's tour names paths that do not exist: {missing}"


def test_the_tour_lists_every_package_in_the_order_import_linter_enforces() -> None:
    config = tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["importlinter"]
    [layers] = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    enforced = [name.strip() for layer in layers for name in layer.split("|")]
    toured = [folder.rstrip("/") for _, folder, _ in _rows()]
    assert sorted(toured) == sorted(enforced) == sorted(config["root_packages"])
    # The three users' packages share a layer: their order in the tour is free.
    position = {name: i for i, layer in enumerate(layers) for name in layer.replace(" ", "").split("|")}
    assert [position[p] for p in toured] == sorted(position[p] for p in toured), (
        f"the tour's order {toured} is not the layers' order {layers}"
    )
    ours = {p.parent.name for p in PROJECT.glob("*/__init__.py")} - {"tests", "bench", "compose"}
    assert ours == set(toured), f"packages missing from the tour: {sorted(ours - set(toured))}"
