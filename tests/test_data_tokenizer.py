"""The caption tokenizer: trained offline, saved, reloaded with from_pretrained; real words survive."""
import pytest

from data_fixtures import caption
from pipeline.config import load_config
from pipeline.data import load_tokenizer, train_tokenizer
from pipeline.data.tokenizer import check_tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer([caption(i) for i in range(300)], out, vocab_size=500), out


def test_roberta_special_ids(trained):
    tok, _ = trained
    assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]) == [0, 1, 2, 3, 4]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2, 4)
    assert tok.is_fast and len(tok) <= 500


@pytest.mark.parametrize("text", ["a dog runs on the beach", "two red birds near the water",
                                  "A zebra plays the xylophone!"])  # words never seen in training too
def test_real_words_survive_a_round_trip(trained, text):
    tok, out = trained
    reloaded = load_tokenizer(out)
    ids = reloaded(text)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and tok.unk_token_id not in ids
    assert reloaded.decode(ids, skip_special_tokens=True) == text
    assert ids == tok(text)["input_ids"]


def test_padding_truncation_and_model_checks(trained):
    tok, _ = trained
    enc = tok(["a dog", " ".join(["sky"] * 50)], max_length=8, truncation=True, padding="max_length")
    n = sum(enc["attention_mask"][0])
    assert enc["attention_mask"][0] == [1] * n + [0] * (8 - n)
    assert enc["input_ids"][0][n - 1] == 2 and enc["input_ids"][0][n:] == [1] * (8 - n)
    assert len(enc["input_ids"][1]) == 8 and enc["input_ids"][1][-1] == 2
    text_cfg = load_config("tiny").model.text
    check_tokenizer(tok, text_cfg)
    text_cfg.vocab_size = len(tok) - 1
    with pytest.raises(ValueError, match="vocab_size"):
        check_tokenizer(tok, text_cfg)
    text_cfg.vocab_size, text_cfg.pad_token_id = 1000, 0
    with pytest.raises(ValueError, match="pad"):
        check_tokenizer(tok, text_cfg)
