"""CSV manifests: the second way in, same manifest DataFrame as a folder scan, bad rows named by line."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from keeneye.config import config_from_dict
from keeneye.data.manifest import load_data, read_manifest
from keeneye.data.scan import MANIFEST_COLUMNS, file_sha1
from keeneye.errors import DataError


def image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    for i in range(6):
        image(tmp_path / "img" / f"{i}.png", i)
    return tmp_path


def write(folder: Path, text: str, name: str = "labels.csv") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def data_error(path: Path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        read_manifest(path, **kwargs)
    assert info.value.exit_code == 2
    return str(info.value)


def test_manifest_becomes_the_same_dataframe_as_a_scan(folder: Path, tmp_path: Path) -> None:
    elsewhere = image(tmp_path / "other" / "abs.png", 99)
    path = write(folder, (
        "Path , LABEL,split,group,notes\n"
        "img/0.png,defect,,part-1,ignored column\n"
        "img/1.png,ok,training,part-1,\n"
        "img/2.png,ok,Validation,,\n"
        "img/3.png,defect,test,part-2,\n"
        f"{elsewhere},ok,TESTING,part-3,\n"
        "\n"  # blank lines are ignored
    ))
    scan = read_manifest(path)
    m = scan.manifest
    assert list(m.columns) == MANIFEST_COLUMNS
    assert m["path"].tolist() == [str(folder / "img" / f"{i}.png") for i in range(4)] + [str(elsewhere)]
    assert m["split"].tolist() == ["training", "training", "validation", "testing", "testing"]
    assert m["group"].tolist() == ["part-1", "part-1", None, "part-2", "part-3"]
    assert m["sha1"].tolist() == [file_sha1(Path(p)) for p in m["path"]]
    assert scan.class_names == ("ok", "defect")  # "ok" is recognised as the normal class
    assert scan.skipped.empty


def test_bad_rows_are_reported_with_their_line_numbers(folder: Path) -> None:
    path = write(folder, (
        "path,label,split\n"            # 1
        "img/0.png,defect,\n"           # 2 fine
        "img/missing.png,ok,\n"         # 3 missing file
        "img/1.png,,\n"                 # 4 empty label
        "img/2.png,ok,tset\n"           # 5 unknown split
        "img/0.png,defect,\n"           # 6 listed again
        ",ok,\n"                        # 7 empty path
        "img/3.png,scratch,\n"          # 8 a third label
        "img,ok,\n"                     # 9 a folder
        "img/4.png,ok,,extra\n"         # 10 too many fields
        "img/5.png,ok,\n"               # 11 fine
    ))
    message = data_error(path)
    assert message.splitlines() == [
        f"{path}: 8 bad rows (line numbers of the file; the header is line 1):",
        f"  line 3: file not found: img/missing.png (resolved to {folder / 'img' / 'missing.png'})",
        "  line 4: empty label",
        "  line 5: unknown split 'tset'; expected training, validation, testing or empty (= training)",
        "  line 6: img/0.png is listed again (first on line 2)",
        "  line 7: empty path",
        "  line 8: label 'scratch' is a third label; a manifest has exactly two ('ok' (5 rows), 'defect' (2 rows), 'scratch' (1 rows))",
        f"  line 9: img is a folder, not a file (resolved to {folder / 'img'})",
        "  line 10: 4 fields but the header has 3 (an unquoted ',' in a value?)",
    ]


def test_line_numbers_survive_quoted_multiline_fields(folder: Path) -> None:
    path = write(folder, 'path,label,group\nimg/0.png,ok,"a group\nspanning lines"\nimg/1.png,defect,x\nimg/nope.png,ok,y\n')
    message = data_error(path)
    assert "  line 5: file not found: img/nope.png" in message


def test_many_bad_rows_are_capped(folder: Path) -> None:
    rows = "".join(f"img/missing{i}.png,ok\n" for i in range(30))
    message = data_error(write(folder, "path,label\n" + rows))
    assert message.splitlines()[0].startswith(f"{folder / 'labels.csv'}: 30 bad rows")
    assert message.splitlines()[-1] == "  ... and 10 more"


def test_header_problems(folder: Path) -> None:
    assert "the header has no label column (found: 'path', 'class')" in data_error(write(folder, "path,class\nimg/0.png,ok\n"))
    assert "names path more than once" in data_error(write(folder, "path,label,Path\nimg/0.png,ok,x\n"))
    assert "the manifest is empty" in data_error(write(folder, "\n\n"))
    assert "no images listed" in data_error(write(folder, "path,label\n"))


def test_semicolon_separated_export(folder: Path) -> None:
    scan = read_manifest(write(folder, "path;label\nimg/0.png;good\nimg/1.png;defect\n"))
    assert scan.manifest["label"].tolist() == ["good", "defect"]
    assert scan.class_names == ("good", "defect")


def test_class_problems(folder: Path) -> None:
    one = write(folder, "path,label\nimg/0.png,ok\nimg/1.png,ok\n")
    assert "expected exactly two classes, found 1: ok" in data_error(one)
    two = write(folder, "path,label\nimg/0.png,a\nimg/1.png,b\n", "two.csv")
    assert "set positive_class" in data_error(two)
    assert read_manifest(two, positive_class="a").class_names == ("b", "a")


def test_load_data_from_config_with_group_pattern(folder: Path) -> None:
    for name in ("vid7_f1.png", "vid7_f2.png", "vid9_f1.png", "loose.png"):
        image(folder / "frames" / name, len(name))
    path = write(folder, "path,label,group\nframes/vid7_f1.png,ok,\nframes/vid7_f2.png,ok,given\nframes/vid9_f1.png,defect,\nframes/loose.png,defect,\n")
    cfg = config_from_dict({"data": {"manifest_path": str(path), "group_pattern": r"^(vid\d+)_"}}, base_dir=folder)
    scan = load_data(cfg)
    # the pattern fills only empty groups; a name that does not match stays ungrouped
    assert scan.manifest["group"].tolist() == ["vid7", "given", "vid9", None]
