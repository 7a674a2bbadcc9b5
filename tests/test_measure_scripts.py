"""scripts/measure_val_groups.py's view of the validation split: the documents it names are the ones prepare_data
held out, under either split rule (the codec-window mask of both measurement scripts rests on it)."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from engram.config import DataConfig
from engram.data import prepare_data
from scripts.measure_val_groups import val_document_names


@pytest.mark.parametrize("split", ["documents", "folders"])
def test_val_document_names_are_the_prepared_validation_documents(tmp_path, split):
    root = tmp_path / "corpus"
    for i in range(24):
        folder = root / ("big" if i < 4 else "small")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"d{i:02d}.txt").write_text(f"doc{i:02d}q " + "word " * (400 if i < 4 else 40 + 5 * i))
    cfg = DataConfig(corpus=str(root), val_fraction=0.2, split=split)
    names = val_document_names(cfg)
    data = prepare_data(cfg, 300, tmp_path / "cache")
    text = Tokenizer.from_file(data.stats["tokenizer_path"]).decode([int(i) for i in np.asarray(data.val)],
                                                                    skip_special_tokens=False)
    held = {f"doc{i:02d}q" for i in range(24) if f"doc{i:02d}q" in text}
    assert names is not None and len(names) == data.stats["documents_val"]
    assert {f"doc{n.split('/d')[1][:2]}q" for n in names} == held
