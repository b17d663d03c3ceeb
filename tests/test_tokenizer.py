"""seqio's SentencePieceVocabulary (+ appended EOS) gives the same ids as HF's T5 tokenizer."""
import os

import pytest

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")
seqio = pytest.importorskip("seqio")

CORPUS = os.path.join(os.path.dirname(__file__), "data", "spm_corpus.txt")
TEXTS = [
    "The reward model gave this answer a thumbs up.",
    "Translate English to German: the weather is nice today.",
    "Question: what is twelve times twelve? Answer: 144.",
    "Unseen words: xylophone, quizzical, Zebra-crossing!",
    "Café, naïve and résumé keep their accents; 3.14159 and 1,000,000 stay numbers.",
    "  leading spaces, double  spaces\tand a tab",
    "UPPER CASE and MiXeD cAsE",
    "a",
    "",
]


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
  """A tiny T5-style SentencePiece model (pad 0, eos 1, unk 2, no bos) trained on CORPUS."""
  out = tmp_path_factory.mktemp("spm")
  spm.SentencePieceTrainer.train(
      input=CORPUS, model_prefix=str(out / "spiece"), vocab_size=200, model_type="unigram",
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
  assert (out / "spiece.model").is_file()
  return str(out)


def test_seqio_ids_plus_eos_equal_hf(spiece_dir):
  vocab = seqio.SentencePieceVocabulary(os.path.join(spiece_dir, "spiece.model"))
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  hf_tok = transformers.T5Tokenizer.from_pretrained(spiece_dir, extra_ids=0)
  non_trivial = 0
  for text in TEXTS:
    ours = list(vocab.encode(text)) + [vocab.eos_id]
    theirs = hf_tok(text).input_ids
    assert ours == theirs, text
    non_trivial += len(ours) > 3 and len(set(ours)) > 3
  assert non_trivial >= 5


def test_extra_ids_do_not_shift_ids(spiece_dir):
  # HF appends 100 sentinel ids after the vocabulary by default; real ids are unchanged.
  vocab = seqio.SentencePieceVocabulary(os.path.join(spiece_dir, "spiece.model"))
  hf_tok = transformers.T5Tokenizer.from_pretrained(spiece_dir)
  for text in TEXTS:
    assert list(vocab.encode(text)) + [1] == hf_tok(text).input_ids
  assert vocab.decode(vocab.encode(TEXTS[0])) == TEXTS[0]


def test_task_token_rows_equal_encode_plus_eos(spiece_dir):
  """The feedback task holds a log's token ids in one flat array: row i is encode(text i) + EOS."""
  from dro_jax.data import tasks

  vocab = seqio.SentencePieceVocabulary(os.path.join(spiece_dir, "spiece.model"))
  texts = [t for t in TEXTS if t] + ["x"]
  ragged = tasks._tokenize(vocab, texts)
  assert ragged.to_list() == [list(vocab.encode(t)) + [vocab.eos_id] for t in texts]
