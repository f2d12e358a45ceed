"""Tests for xlmr.py: XLM-R against a reference forward written out here, its tokenizer on
hand-built Unigram vocabularies (tokenizer.json and a hand-encoded SentencePiece .model), the
loaders' errors, and the study's towers (HF DINO + XLM-R) through train.py and factory.py."""
import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F

import factory
import xlmr
from test_pretrained import (TEXT, hf_vit_config, hf_vit_state_dict, write_safetensors,
                             _message)

# ----------------------------------------------------------------------------- the tokenizer

# A hand-built Unigram vocabulary in XLM-R's layout (ids = positions; <mask> last). Scores are
# exact binary fractions, so the sums below are exact and ties are real ties.
VOCAB = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0),        # 0-3
         ("▁", -2.0), ("▁a", -1.5), ("▁cat", -4.0), ("▁ca", -2.0),           # 4-7
         ("t", -3.0), ("s", -3.0), ("ts", -1.5), ("c", -5.0),                 # 8-11
         ("a", -4.0), ("▁photo", -3.0), ("▁of", -2.5), ("fi", -3.5),         # 12-15
         ("▁fi", -4.5), ("zz", -1.0), ("<mask>", 0.0)]                        # 16-18
# HF's converter today: the charsmap, strip on the right, runs of spaces to one "▁"
NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Precompiled", "precompiled_charsmap": "ALQCAACEAAAAAACAAQA="},
    {"type": "Strip", "strip_left": False, "strip_right": True},
    {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "▁"}]}
PRE_TOKENIZER = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                 "split": True}


def tokenizer_json(normalizer=NORMALIZER, pre_tokenizer=PRE_TOKENIZER, vocab=VOCAB):
    """tokenizer.json as HF writes it for XLM-R (the parts that matter, plus some that do not)."""
    specials = [(i, p) for i, (p, _) in enumerate(vocab) if p.startswith("<")]
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": p, "single_word": False, "lstrip": p == "<mask>",
                              "rstrip": False, "normalized": False, "special": True}
                             for i, p in specials],
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
            "post_processor": {"type": "TemplateProcessing"},
            "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"},
            "model": {"type": "Unigram", "unk_id": 3, "vocab": [list(v) for v in vocab],
                      "byte_fallback": False}}


def test_unigram_segmentations_worked_by_hand():
    tok = xlmr.XLMRTokenizer(VOCAB, 3, NORMALIZER, PRE_TOKENIZER)
    assert (tok.sot_id, tok.pad_id, tok.eot_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 18)
    assert tok.vocab_size == 19 and tok.unk_score == -15.0  # min score -5 ("c") minus 10
    cases = {
        # words "▁a" "▁photo" "▁of" "▁a" "▁cat"; "▁cat": ▁cat -4 beats ▁ca+t -2-3 = -5
        "a photo of a cat": [0, 5, 13, 14, 5, 6, 2],
        # "▁cats": ▁ca+ts = -2-1.5 = -3.5 beats ▁cat+s = -4-3 = -7 (greedy longest-first's pick)
        "cats": [0, 7, 10, 2],
        # "▁caxxt": ▁ca, x and x unknown (-15 each), t: the two unknowns fuse into one <unk>
        "caxxt": [0, 7, 3, 8, 2],
        # "▁zzz": no "z" piece, so z is <unk> (-15) wherever no piece covers it:
        #   ▁ + zz + z(unk) = -2-1-15 = -18 and ▁ + z(unk) + zz = -2-15-1 = -18, a tie: the path
        #   whose last piece starts first (zz at 2) is found first and kept, as in HF
        "zzz": [0, 4, 3, 17, 2],
        # NFKC: fullwidth letters and the "ﬁ" ligature; "▁fi" -4.5 beats ▁+fi = -2-3.5 = -5.5
        "ｃａｔ ﬁ": [0, 6, 16, 2],
        # tab -> space (nmt_nfkc), right strip, "  " -> "▁": "▁a cat" -> "▁a▁cat" (no prefix
        # added: it starts with "▁")
        "  a\tcat  ": [0, 5, 6, 2],
        # "▁A": ▁ -2 + A(unk) -15; "▁Cat": ▁, C(unk), a -4, t -3
        "A Cat": [0, 4, 3, 4, 3, 12, 8, 2],
        "": [0, 2],
        " ": [0, 2],  # stripped to nothing; HF prepends no "▁" to an empty string
    }
    for text, ids in cases.items():
        assert tok.encode(text) == ids, text
    assert tok.decode([0, 5, 13, 14, 5, 6, 2, 1, 1]) == "a photo of a cat"
    # batch: pad id 1; truncation keeps </s>
    ids = tok(["a photo of a cat", "cats"], context_length=5)
    assert ids.tolist() == [[0, 5, 13, 14, 2], [0, 7, 10, 2, 1]]
    assert tok("cats", context_length=2).tolist() == [[0, 2]]
    # older tokenizer.json: no strip, no space collapsing, add_prefix_space
    legacy = xlmr.XLMRTokenizer(VOCAB, 3, {"type": "Precompiled", "precompiled_charsmap": "AA=="},
                                {"type": "Metaspace", "replacement": "▁",
                                 "add_prefix_space": True})
    assert legacy.encode("a  cat") == [0, 5, 4, 6, 2]  # "▁a▁▁cat": "▁a", "▁", "▁cat"
    assert legacy.encode(" ") == [0, 4, 2]  # "▁" alone is a word


def varint(n):
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n >> 7 else 0)])
        n >>= 7
        if not n:
            return out


def field(number, wire, payload):
    """One protobuf field: key (number << 3 | wire type), then a varint (0), 4 or 8 raw bytes
    (5, 1), or a length and the bytes (2)."""
    key = varint(number << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def spm_piece(piece, score, kind):
    return (field(1, 2, piece.encode()) + field(2, 5, struct.pack("<f", score))
            + field(3, 0, kind))


def spm_model(vocab=VOCAB):
    """XLM-R's sentencepiece.bpe.model for VOCAB: SentencePiece's <unk> <s> </s> (types 2, 3, 3)
    then the pieces (ids shift by fairseq's offset 1), a trainer spec we skip, a normalizer."""
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(p, s, 1) for p, s in vocab[4:-1]]
    trainer = field(1, 2, b"corpus.txt") + field(3, 0, 250000) + field(9, 1, b"\0" * 8)
    normalizer = (field(1, 2, b"nmt_nfkc") + field(2, 2, b"\x00\x01charsmap")
                  + field(3, 0, 1) + field(4, 0, 1) + field(5, 0, 1))
    return (b"".join(field(1, 2, spm_piece(*p)) for p in pieces) + field(2, 2, trainer)
            + field(3, 2, normalizer))


def test_sentencepiece_model_and_tokenizer_json_give_the_same_ids(tmp_path):
    # the wire format, one piece by hand: field 1 (len-delimited) "▁a" = e2 96 81 61; field 2
    # (32-bit) -1.5 = 0xbfc00000 little-endian; field 3 (varint) type 1
    assert spm_piece("▁a", -1.5, 1) == b"\x0a\x04\xe2\x96\x81a\x15\x00\x00\xc0\xbf\x18\x01"
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "sentencepiece.bpe.model").write_bytes(spm_model())
    from_json = xlmr.XLMRTokenizer.from_pretrained(tmp_path / "json")
    from_spm = xlmr.XLMRTokenizer.from_pretrained(tmp_path / "spm")
    assert from_spm.vocab == from_json.vocab == VOCAB
    texts = ["a photo of a cat", "cats", "caxxt", "zzz", "ｃａｔ ﬁ", "  a\tcat  ", "A Cat", "",
             "of  a\u3000photo", "cat\u200bs\x07"]
    for text in texts:
        assert from_spm.encode(text) == from_json.encode(text), text
    assert from_json.encode("of  a\u3000photo") == [0, 14, 5, 13, 2]  # U+3000 -> " " (NFKC)
    assert from_json.encode("cat\u200bs\x07") == [0, 6, 4, 9, 2]  # ZWSP -> " ", BEL dropped
    again = xlmr.XLMRTokenizer(**from_spm.state())  # what checkpoints keep
    assert [again.encode(t) for t in texts] == [from_spm.encode(t) for t in texts]
    assert torch.equal(again(texts, 6), from_json(texts, 6))


def test_tokenizer_errors_are_one_line(tmp_path):
    assert "no such file, nor sentencepiece.bpe.model" in _message(
        xlmr.XLMRTokenizer.from_pretrained, tmp_path)
    spec = tokenizer_json()
    spec["model"] = {"type": "BPE", "vocab": {}, "merges": []}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert "model type 'BPE', expected 'Unigram'" in _message(
        xlmr.XLMRTokenizer.from_pretrained, tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json(
        normalizer={"type": "BertNormalizer"})))
    assert "normalizer 'BertNormalizer' is not supported" in _message(
        xlmr.XLMRTokenizer.from_pretrained, tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "sentencepiece.bpe.model").write_bytes(spm_model()[:-3])  # cut mid-field
    assert "truncated or not a protobuf" in _message(xlmr.XLMRTokenizer.from_pretrained, tmp_path)
    wrong = b"".join(field(1, 2, spm_piece(p, 0.0, 1)) for p in ("<s>", "</s>", "<unk>", "a"))
    (tmp_path / "sentencepiece.bpe.model").write_bytes(wrong)
    assert "expected <unk> <s> </s>" in _message(xlmr.XLMRTokenizer.from_pretrained, tmp_path)
    assert "needs <s>, <pad>, </s>, <unk>, <mask>" in _message(xlmr.XLMRTokenizer, VOCAB[:-1], 3)


# ----------------------------------------------------------------------------- the encoder

XW, XLAYERS, XHEADS, XHIDDEN, XPOS = 16, 2, 2, 40, 12  # MLP 40 != 4 W: intermediate_size is read


def xlmr_config(vocab_size=len(VOCAB), **changes):
    return {"model_type": "xlm-roberta", "architectures": ["XLMRobertaForMaskedLM"],
            "vocab_size": vocab_size, "hidden_size": XW, "num_hidden_layers": XLAYERS,
            "num_attention_heads": XHEADS, "intermediate_size": XHIDDEN, "hidden_act": "gelu",
            "layer_norm_eps": 1e-5, "max_position_embeddings": XPOS, "type_vocab_size": 1,
            "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
            "position_embedding_type": "absolute", **changes}


def xlmr_state_dict(vocab_size=len(VOCAB), positions=XPOS, seed=0):
    """XLMRobertaForMaskedLM's state dict ("roberta." names, plus its LM head), random."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g)

    e = "roberta.embeddings."
    sd = {e + "word_embeddings.weight": randn(vocab_size, XW),
          e + "position_embeddings.weight": randn(positions, XW),
          e + "token_type_embeddings.weight": randn(1, XW),
          e + "LayerNorm.weight": 1 + randn(XW, scale=0.1),
          e + "LayerNorm.bias": randn(XW, scale=0.1),
          e + "position_ids": torch.arange(positions)[None],
          "lm_head.dense.weight": randn(XW, XW), "lm_head.bias": randn(vocab_size)}
    for i in range(XLAYERS):
        p = f"roberta.encoder.layer.{i}."
        for name, (o, n) in [("attention.self.query", (XW, XW)), ("attention.self.key", (XW, XW)),
                             ("attention.self.value", (XW, XW)),
                             ("attention.output.dense", (XW, XW)),
                             ("intermediate.dense", (XHIDDEN, XW)),
                             ("output.dense", (XW, XHIDDEN))]:
            sd[p + name + ".weight"] = randn(o, n, scale=n ** -0.5)
            sd[p + name + ".bias"] = randn(o, scale=0.1)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[p + name + ".weight"] = 1 + randn(XW, scale=0.1)
            sd[p + name + ".bias"] = randn(XW, scale=0.1)
    return sd


def xlmr_reference(sd, ids):
    """HF's XLMRobertaModel written out, attention_mask = (ids != 1): last_hidden_state."""
    def ln(x, name):
        return F.layer_norm(x, (XW,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)

    def linear(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    B, L = ids.shape
    positions = torch.ones(B, L, dtype=torch.long)  # padding_idx for padding
    for b in range(B):  # create_position_ids_from_input_ids: 2, 3, ... over the real tokens
        count = 0
        for t in range(L):
            if ids[b, t] != 1:
                count += 1
                positions[b, t] = 1 + count
    e = "roberta.embeddings."
    x = (sd[e + "word_embeddings.weight"][ids] + sd[e + "position_embeddings.weight"][positions]
         + sd[e + "token_type_embeddings.weight"][0])
    x = ln(x, e + "LayerNorm")
    d = XW // XHEADS
    for i in range(XLAYERS):
        p = f"roberta.encoder.layer.{i}."
        q, k, v = (linear(x, p + "attention.self." + n).view(B, L, XHEADS, d).transpose(1, 2)
                   for n in ("query", "key", "value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores + torch.finfo(x.dtype).min * (ids == 1)[:, None, None, :]  # HF's mask
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, XW)
        x = ln(linear(context, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        h = F.gelu(linear(x, p + "intermediate.dense"))
        x = ln(linear(h, p + "output.dense") + x, p + "output.LayerNorm")
    return x


IDS = torch.tensor([[0, 5, 13, 14, 6, 2, 1, 1, 1, 1],
                    [0, 7, 10, 2, 1, 1, 1, 1, 1, 1],
                    [1, 1, 0, 17, 3, 12, 8, 9, 2, 1]])  # left padding too: positions skip it


@pytest.fixture
def xlmr_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(xlmr_config()))
    write_safetensors(tmp_path / "model.safetensors", xlmr_state_dict())
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
    return tmp_path


def test_xlmr_matches_reference(xlmr_dir):
    tower = xlmr.load_hf_xlmr(xlmr_dir)
    assert tower.context_length == XPOS - 2 and tower.config["kind"] == "xlmr"
    want = xlmr_reference(xlmr_state_dict(), IDS)
    real = IDS != 1
    with torch.no_grad():
        torch.testing.assert_close(tower(IDS)[real], want[real], atol=1e-5, rtol=1e-5)
        short = xlmr.load_hf_xlmr(xlmr_dir, context_length=9)  # keeps 9 + 2 position rows
        assert short.embeddings.position_embeddings.weight.shape == (11, XW)
        torch.testing.assert_close(short(IDS[:, :9])[real[:, :9]], want[:, :9][real[:, :9]],
                                   atol=1e-5, rtol=1e-5)
        # padding changes nothing at the real tokens, wherever it is
        moved = torch.tensor([[1, 1, 1, 1, 0, 5, 13, 14, 6, 2]])
        torch.testing.assert_close(tower(moved)[0, 4:], tower(IDS[:1])[0, :6], atol=1e-5,
                                   rtol=1e-5)


def test_xlmr_text_tower_in_clip(xlmr_dir):
    model = factory.create_model("tiny", text=f"xlmr:{xlmr_dir}", context_length=10).eval()
    assert model.config["text_tower"]["kind"] == "xlmr" and model.vocab_size == len(VOCAB)
    want = xlmr_reference(xlmr_state_dict(), IDS)
    with torch.no_grad():
        z, tokens = model.encode_text(IDS, return_tokens=True)
        torch.testing.assert_close(z, want[:, 0] @ model.text_projection, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(z[2], want[2, 2] @ model.text_projection, atol=1e-3)  # not <s>'s
    rebuilt = factory.from_config(model.config).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_text(IDS), z, atol=0, rtol=0)
    tok = factory.load_tokenizer(f"xlmr:{xlmr_dir}")
    assert tok(["a photo of a cat"], 10).tolist() == [[0, 5, 13, 14, 5, 6, 2, 1, 1, 1]]
    assert "positions XLM-R was trained with" in _message(
        factory.create_model, "tiny", text=f"xlmr:{xlmr_dir}", context_length=32)


def test_xlmr_errors_are_one_line(tmp_path):
    def load(**kw):
        return xlmr.load_hf_xlmr(tmp_path, **kw)

    assert "config.json: no such file" in _message(load)
    (tmp_path / "config.json").write_text(json.dumps(xlmr_config(model_type="vit")))
    assert "model_type 'vit', expected 'xlm-roberta'" in _message(load)
    (tmp_path / "config.json").write_text(json.dumps(xlmr_config()))
    assert "model.safetensors: no such file" in _message(load)
    torch.save(xlmr_state_dict(), tmp_path / "pytorch_model.bin")
    assert isinstance(load(), xlmr.XLMRobertaModel)  # the .bin alone will do
    (tmp_path / "config.json").write_text(json.dumps(xlmr_config(hidden_size=2 * XW)))
    msg = _message(load)
    assert "pytorch_model.bin: weights do not fit this XLMRobertaModel" in msg
    assert "shape mismatches" in msg
    config = xlmr_config()
    del config["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "no 'num_hidden_layers'" in _message(load)


def test_declip_mlm_runs_on_xlmr_tokens(xlmr_dir):
    """DeCLIP's MLM on an XLM-R text tower: masks fall between <s> and </s> only, the masked
    ids carry the tokenizer's <mask>, and L_TSS is the cross-entropy of the head on XLM-R's last
    hidden states at those positions."""
    import declip

    torch.manual_seed(0)
    model = factory.create_model("tiny", text=f"xlmr:{xlmr_dir}", context_length=10)
    tok = factory.load_tokenizer(f"xlmr:{xlmr_dir}")
    ids = tok(["a photo of a cat", "cats of a cat", "zzz"], 10)  # (3, 10)
    method = declip.DeCLIP(model, mvs=False, nns=False, mask_id=tok.mask_id,
                           vocab_size=tok.vocab_size, sot_id=tok.sot_id, eot_id=tok.eot_id)
    masked, labels = declip.mask_tokens(ids, tok.mask_id, tok.vocab_size, method.special_ids,
                                        p=0.6, generator=torch.Generator().manual_seed(1))
    chosen = labels != -100
    special = (ids == tok.sot_id) | (ids == tok.eot_id) | (ids == tok.pad_id)
    assert chosen.any() and not (chosen & special).any() and (masked == tok.mask_id).any()
    images = torch.randn(3, 3, 64, 64)
    _, terms = method(images, images.flip(-1), ids, None, masked=(masked, labels))
    with torch.no_grad():
        tokens = model.text(masked)  # (3, 10, W): XLM-R on the masked caption (shared pass)
        want = F.cross_entropy(method.mlm_head(tokens[chosen]), ids[chosen])
    torch.testing.assert_close(terms["tss"], want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- end to end

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def test_study_towers_train_save_and_evaluate(tmp_path):
    """train.py with an HF DINO folder and an XLM-R folder (both tiny, written here): SigLIP for
    2 steps (the study's row), evaluated at the end; then factory.load_model_and_tokenizer
    rebuilds model and tokenizer from the checkpoint alone."""
    import train

    vit = tmp_path / "dino"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps(hf_vit_config()))
    write_safetensors(vit / "model.safetensors", hf_vit_state_dict())
    text = tmp_path / "xlmr"
    text.mkdir()  # a letter-level vocabulary: every built-in caption is covered
    vocab = VOCAB[:5] + [(c, -3.0) for c in LETTERS] + [("<mask>", 0.0)]
    (text / "config.json").write_text(json.dumps(xlmr_config(len(vocab),
                                                             max_position_embeddings=34)))
    write_safetensors(text / "model.safetensors", xlmr_state_dict(len(vocab), positions=34))
    (text / "tokenizer.json").write_text(json.dumps(tokenizer_json(vocab=vocab)))
    out = tmp_path / "run"
    result = train.main(["--batch-size", "8", "--eval-size", "20", "--workers", "0",
                         "--warmup", "1", "--queue-size", "16", "--steps", "2",
                         "--model", "tiny", "--method", "clip", "--loss", "siglip",
                         "--output", str(out),
                         "--pretrained-image", f"hf-vit:{vit}",
                         "--pretrained-text", f"xlmr:{text}"])
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["tokenizer"]["kind"] == "xlmr" and ckpt["merges"] is None
    assert ckpt["model_config"]["text_tower"]["kind"] == "xlmr"
    model, tok = factory.load_model_and_tokenizer(str(out / "checkpoint.pt"))
    assert isinstance(tok, xlmr.XLMRTokenizer) and tok.mask_id == len(vocab) - 1
    assert tok.encode("a red circle") == [0, 4, 5, 4] + [5 + LETTERS.index(c) for c in "red"] \
        + [4] + [5 + LETTERS.index(c) for c in "circle"] + [2]
    assert all(torch.equal(v, ckpt["state_dict"][k]) for k, v in model.state_dict().items())
    with torch.no_grad():  # the reloaded pair encodes prompts as the trained one did
        z = model.encode_text(tok(["a photo of a red circle."], 32))
        trained = factory.from_config(ckpt["model_config"]).eval()
        trained.load_state_dict(ckpt["state_dict"])
        torch.testing.assert_close(z, trained.encode_text(tok(["a photo of a red circle."], 32)))
    args = train.get_args(["--preset", "study-dino-xlmr-siglip-cc3m"])
    assert (args.pretrained_image, args.pretrained_text, args.loss, args.model) == (
        "hf-vit:data/dino-vits16", "xlmr:data/xlm-roberta-base", "siglip", "ViT-S-16")
