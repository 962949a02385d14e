"""Labels <-> folders: every label the API accepts reads back from its folder unchanged."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from imgsearch.indexer.scan import scan
from imgsearch.labels import LABEL_FILE, label_folder, read_folder_label, write_label_file

LABELS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=120)


@settings(max_examples=300, deadline=None)
@given(LABELS)
def test_a_label_reads_back_from_its_folder_name_or_its_label_file(label):
    folder = label_folder(label)
    assert "/" not in folder and not folder.startswith(".") and folder not in ("", "..")
    assert len(folder.encode("utf-8")) <= 255
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / folder
        path.mkdir()
        if folder != label:  # the folder name cannot say it: the label file does
            assert write_label_file(path, label)
        assert read_folder_label(path) == label


def test_slugged_labels_are_told_apart_and_read_back(tmp_path):
    labels = ["a/b", "a_b", "a?b", ".hidden", "n02085620-Chihuahua", "x" * 300, "..", "柴犬/2"]
    folders = {label: label_folder(label) for label in labels}
    assert len(set(folders.values())) == len(labels)  # no two labels share a folder
    for label, folder in folders.items():
        (tmp_path / folder).mkdir()
        if folder != label:
            assert write_label_file(tmp_path / folder, label)
        (tmp_path / folder / "one.jpg").write_bytes(b"x")
        assert read_folder_label(tmp_path / folder) == label
    found = scan(tmp_path)
    assert {f.rel.split("/")[0]: f.label for f in found.files} == {f: lbl for lbl, f in folders.items()}
    assert sum(found.ignored.values()) == 0  # the label files are not counted as skipped files


def test_a_folder_keeps_the_label_it_was_claimed_for(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def claim(label: str) -> None:
        barrier.wait()
        results.append(write_label_file(folder, label))

    threads = [threading.Thread(target=claim, args=(f"label {i % 2}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = read_folder_label(folder)
    assert winner in ("label 0", "label 1")
    assert results.count(True) == 4  # every claim for the winner succeeds, none for the other
    assert write_label_file(folder, winner) and not write_label_file(folder, "another")
    assert [p.name for p in folder.iterdir()] == [LABEL_FILE]  # no temporary file left
