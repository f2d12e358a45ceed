"""Retrieval Recall@K against brute-force sorting (ties, several captions per image); readers."""
import json
import random

import pytest
import torch
from PIL import Image

import retrieval


def brute_force_ranks(z_img, z_txt, img_of_txt):
    """Sort every candidate list with ties broken against the model (wrong before right)."""
    s = (z_img @ z_txt.T).tolist()
    N, M = len(s), len(img_of_txt)
    i2t = []
    for i in range(N):
        order = sorted(range(M), key=lambda j: (-s[i][j], img_of_txt[j] == i))
        i2t.append(next(r for r, j in enumerate(order) if img_of_txt[j] == i))
    t2i = []
    for j in range(M):
        order = sorted(range(N), key=lambda i: (-s[i][j], i == img_of_txt[j]))
        t2i.append(order.index(img_of_txt[j]))
    return i2t, t2i


def brute_force_recall(ranks, k):
    return sum(r < k for r in ranks) / len(ranks)


@pytest.mark.parametrize("seed", range(5))
def test_ranks_and_recall_match_brute_force_with_ties(seed):
    rng = random.Random(seed)
    N, D = 12, 3
    # several captions for some images; integer features in {-1, 0, 1}: exact ties everywhere
    img_of_txt = list(range(N)) + [rng.randrange(N) for _ in range(10)]
    rng.shuffle(img_of_txt)
    z_img = torch.tensor([[rng.choice((-1., 0., 1.)) for _ in range(D)] for _ in range(N)])
    z_txt = torch.tensor([[rng.choice((-1., 0., 1.)) for _ in range(D)]
                          for _ in img_of_txt])
    i2t, t2i = brute_force_ranks(z_img, z_txt, img_of_txt)
    for chunk in (1 << 24, 7):  # one block, and blocks of one or two rows/columns
        r_i2t, r_t2i = retrieval.retrieval_ranks(z_img, z_txt, img_of_txt, chunk_elements=chunk)
        assert r_i2t.tolist() == i2t and r_t2i.tolist() == t2i
    result = retrieval.recall_at_k(z_img, z_txt, img_of_txt, ks=(1, 2, 5, 10))
    for k in (1, 2, 5, 10):
        assert result["image_to_text"][k] == brute_force_recall(i2t, k)
        assert result["text_to_image"][k] == brute_force_recall(t2i, k)
    assert result["n_images"] == N and result["n_texts"] == len(img_of_txt)


def test_ties_count_against_the_model_by_hand():
    # every score equal: image 0 has 2 captions and 2 wrong ones ahead of them, image 1 has 3
    img_of_txt = [0, 0, 1, 2]
    r = retrieval.recall_at_k(torch.zeros(3, 2), torch.zeros(4, 2), img_of_txt, ks=(1, 3, 4))
    assert r["image_to_text"] == {1: 0.0, 3: 1 / 3, 4: 1.0}   # ranks 2, 3, 3
    assert r["text_to_image"] == {1: 0.0, 3: 1.0, 4: 1.0}     # ranks 2, 2, 2, 2
    # an image's two captions tied with each other at the top do not compete
    z_img = torch.tensor([[1., 0], [0, 1]])
    z_txt = torch.tensor([[1., 0], [1, 0], [0, 1]])
    r = retrieval.recall_at_k(z_img, z_txt, [0, 0, 1], ks=(1,))
    assert r["image_to_text"][1] == 1.0 and r["text_to_image"][1] == 1.0
    # but a wrong caption tied with the right one does: rank 1, not 0
    z_txt = torch.tensor([[1., 0], [1, 0], [0, 1]])
    r = retrieval.recall_at_k(z_img, z_txt, [0, 1, 1], ks=(1, 2))
    assert r["image_to_text"] == {1: 0.5, 2: 1.0}


def test_bad_caption_maps_are_refused():
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval.recall_at_k(torch.zeros(3, 2), torch.zeros(2, 2), [0, 1])
    with pytest.raises(ValueError, match="outside"):
        retrieval.recall_at_k(torch.zeros(2, 2), torch.zeros(2, 2), [0, 2])


def test_csv_reader_groups_rows_of_one_image(tmp_path):
    (tmp_path / "pairs.tsv").write_text("filepath\ttitle\n"
                                        "a.png\ta red circle\n"
                                        "b.png\ta blue square\n"
                                        "a.png\tred disc\n"
                                        "c.png\t  \n")  # empty caption: the row is dropped
    pairs = retrieval.read_csv(str(tmp_path / "pairs.tsv"))
    assert pairs.images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert pairs.captions == ["a red circle", "a blue square", "red disc"]
    assert pairs.img_of_txt == [0, 1, 0]
    with pytest.raises(FileNotFoundError, match="2 of 2 images not found"):
        retrieval.check_files(pairs, "--dataset pairs.tsv")
    (tmp_path / "other.csv").write_text("path,caption\nx.png,hello\n")
    pairs = retrieval.read_csv(str(tmp_path / "other.csv"), "path", "caption")
    assert pairs.captions == ["hello"] and pairs.img_of_txt == [0]
    with pytest.raises(ValueError, match="no column 'filepath'"):
        retrieval.read_csv(str(tmp_path / "other.csv"))


def test_karpathy_json_reader(tmp_path):
    layout = {"images": [
        {"filepath": "val2014", "filename": "1.jpg", "split": "test",
         "sentences": [{"raw": "A man on a horse."}, {"raw": "Someone riding."}]},
        {"filepath": "val2014", "filename": "2.jpg", "split": "val",
         "sentences": [{"raw": "Not in the test split."}]},
        {"filepath": "train2014", "filename": "3.jpg", "split": "restval",
         "sentences": [{"raw": "Neither."}]},
        {"filename": "4.jpg", "split": "test",  # Flickr30k's layout has no filepath
         "sentences": [{"raw": "Two dogs."}]},
    ]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(layout))
    pairs = retrieval.read_karpathy_json(str(path))
    assert pairs.images == [str(tmp_path / "val2014" / "1.jpg"), str(tmp_path / "4.jpg")]
    assert pairs.captions == ["A man on a horse.", "Someone riding.", "Two dogs."]
    assert pairs.img_of_txt == [0, 0, 1]
    pairs = retrieval.read_karpathy_json(str(path), "val", image_root="/data/coco")
    assert pairs.images == ["/data/coco/val2014/2.jpg"] and pairs.img_of_txt == [0]
    with pytest.raises(ValueError, match="restval, test, val"):
        retrieval.read_karpathy_json(str(path), "train")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a Karpathy-split JSON"):
        retrieval.read_karpathy_json(str(tmp_path / "bad.json"))


def test_cli_on_a_csv_and_on_builtin(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint
    for k, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (80, 64), colour).save(tmp_path / f"{k}.png")
    (tmp_path / "p.csv").write_text("filepath,title\n0.png,red\n1.png,blue\n0.png,crimson\n"
                                    "2.png,green\n")
    out = tmp_path / "r.json"
    retrieval.main(["--checkpoint", str(ckpt), "--dataset", str(tmp_path / "p.csv"),
                    "--workers", "0", "--device", "cpu", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["n_images"] == 3 and saved["n_texts"] == 4
    assert saved["image_to_text"]["10"] == 1.0  # fewer candidates than K: always a hit
    retrieval.main(["--checkpoint", str(ckpt), "--n", "20", "--workers", "0", "--device", "cpu",
                    "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["n_images"] == 20 and 0 <= saved["text_to_image"]["1"] <= 1
    with pytest.raises(SystemExit, match="retrieval.py: --dataset .*no such file"):
        retrieval.main(["--checkpoint", str(ckpt), "--dataset", str(tmp_path / "none.csv")])
