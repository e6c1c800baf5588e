"""Prediction alignment of layer-dropped GGUF littles (bild/training/heal.py): the student is the file's own model
(kept layers, kept head rows), LoRA starts as the identity, training lowers the loss and resumes where it stopped."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_gguf import IDS, LIKE_0_5B, native_logits, tiny_qwen2, write_gguf

from bild import native
from bild.native import gguf as G
from bild.training import heal

KEPT = torch.tensor([0, 2, 5, 8, 19, 64, 77, 250, 300])


def file_pair(tmp_path, types=LIKE_0_5B):
    path = tmp_path / "little.gguf"
    write_gguf(tiny_qwen2(3, layers=3), path, types)
    return str(path)


def test_student_is_the_files_kept_layers_and_head_rows(tmp_path):
    path = file_pair(tmp_path)
    want = native_logits(native.keep_layers(G.load(path, int8=False), [0, 2]), IDS)[:, KEPT]  # (T, kept)
    with torch.no_grad():
        got = heal.student(path, [0, 2], KEPT)(input_ids=torch.tensor([IDS])).logits[0]
    assert got.shape == (len(IDS), len(KEPT))
    assert (got - want).abs().max() < 1e-3 * want.abs().max()


def test_lora_starts_as_the_identity_and_freezes_the_base(tmp_path):
    model = heal.student(file_pair(tmp_path), [0, 1, 2], KEPT)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        lora = heal.add_lora(model, rank=4, alpha=8.0)
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert len(lora) == 3 * 7
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".a", ".b")) for n in trainable)


def test_examples_label_outputs_in_head_indices_and_count_misses():
    exs = heal.examples([[5, 77, 3]], [[250, 19, 7, 2]], KEPT, 320, max_tokens=16)
    (ex,) = exs
    assert ex["ids"].tolist() == [5, 77, 3, 250, 19, 7, 2]
    index = {int(t): i for i, t in enumerate(KEPT)}
    assert ex["labels"].tolist() == [-100, -100, index[250], index[19], -100, index[2], -100]  # 7 is not kept
    assert ex["predicts"].tolist() == [False, False, True, True, True, True, False]


def test_training_lowers_the_loss_and_resumes(tmp_path):
    path = file_pair(tmp_path)
    exs = heal.examples([[5, 77, 3]], [[250, 19, 64, 8, 300, 2] * 2], KEPT, 320, max_tokens=32)
    cfg = heal.HealConfig(rank=4, alpha=8.0, lr=3e-2, epochs=6, accumulate=1, eval_every=3)
    out = tmp_path / "run"
    out.mkdir()
    model = heal.student(path, [0, 2], KEPT)
    lora = heal.add_lora(model, cfg.rank, cfg.alpha)
    with torch.no_grad():
        start = float(heal.loss_of(model, exs[0]))
    half = heal.HealConfig(**{**cfg.__dict__, "epochs": 3})
    heal.train(model, lora, exs, exs, half, str(out), log=lambda _: None)
    model = heal.student(path, [0, 2], KEPT)  # a fresh process: the checkpoint brings the deltas back
    lora = heal.add_lora(model, cfg.rank, cfg.alpha)
    last = heal.train(model, lora, exs, exs, cfg, str(out), log=lambda _: None)
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    assert last["loss"] < 0.5 * start
    assert last["agreement"] > heal.agreement(heal.student(path, [0, 2], KEPT), exs)


def test_exported_deltas_merge_into_the_native_little(tmp_path, tok):
    """The directory `bild draft heal` writes: the native little on the file plus merged deltas computes what the
    trained student does (Q8_0 projections: requantised to Q8_0, close), and greedy speculative with it equals ar."""
    from bild import BigLittle
    from bild.drafts import gguf as gguf_little

    path = file_pair(tmp_path, {**LIKE_0_5B, **{k: LIKE_0_5B["attn_v"] for k in heal.PROJECTIONS}})  # all Q8_0
    torch.manual_seed(0)
    model = heal.student(path, [0, 2], KEPT)
    lora = heal.add_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for m in lora.values():
            m.b.normal_(0, 0.5)  # deltas well above the requantisation noise of the random blocks
        want = model(input_ids=torch.tensor([IDS])).logits[0]  # (T, kept)
    little = tmp_path / "little"
    little.mkdir()
    assert heal.export(lora, str(little / "deltas.safetensors")) > 0
    gguf_little.save(str(little), gguf_little.GGUFLittle(model=path, vocab_size=len(KEPT), layers=[0, 2],
                                                         deltas="deltas.safetensors"), KEPT.tolist())
    runner = gguf_little.load(str(little), int8=False)
    runner.start(IDS)
    got = runner.forward(IDS, keep=len(IDS))[:, KEPT]  # (T, kept)
    plain = native_logits(native.keep_layers(G.load(path, int8=False), [0, 2]), IDS)[:, KEPT]
    assert (got - want).abs().max() < 0.05 * (plain - want).abs().max()  # the deltas are in, up to requantising

    big = G.load(path)
    bl = BigLittle.from_runners(native.NativeRunner(big), gguf_little.load(str(little)), tok, {2}, "healed")
    ar = bl.generate([1, 7, 8], policy="ar", max_new_tokens=16).token_ids
    assert bl.generate([1, 7, 8], policy="speculative", max_new_tokens=16).token_ids == ar


def test_a_trained_head_merges_into_the_reduced_head_of_an_early_exit(tmp_path, tok):
    """An early exit of a file (its first layers) with LoRA on the head's kept rows too (`--head`): the native little
    computes what the student does (float32 weights stay float32: equal up to the deltas' fp16), and greedy
    speculative with it equals ar. A head that also takes the prompt's tokens cannot carry the trained rows: a
    clear error."""
    from bild import BigLittle, BildError
    from bild.drafts import gguf as gguf_little

    path = file_pair(tmp_path, {})  # every weight float32
    torch.manual_seed(1)
    model = heal.student(path, [0, 1], KEPT)
    lora = heal.add_lora(model, rank=4, alpha=8.0, head=True)
    assert len(lora) == 2 * 7 + 1 and lora["head"].base.out_features == len(KEPT)
    with torch.no_grad():
        for m in lora.values():
            m.b.normal_(0, 0.5)
        want = model(input_ids=torch.tensor([IDS])).logits[0]  # (T, kept)
    little = tmp_path / "exit"
    little.mkdir()
    heal.export(lora, str(little / "deltas.safetensors"))
    recipe = gguf_little.GGUFLittle(model=path, vocab_size=len(KEPT), layers=[0, 1], deltas="deltas.safetensors")
    gguf_little.save(str(little), recipe, KEPT.tolist())
    assert gguf_little.trained_parameters(str(little)) == sum(m.a.numel() + m.b.numel() for m in lora.values())
    runner = gguf_little.load(str(little), int8=False)
    runner.start(IDS)
    got = runner.forward(IDS, keep=len(IDS))[:, KEPT]  # (T, kept)
    plain = native_logits(native.keep_layers(G.load(path, int8=False), [0, 1]), IDS)[:, KEPT]
    assert (got - want).abs().max() < 0.01 * (plain - want).abs().max()

    big = G.load(path)
    bl = BigLittle.from_runners(native.NativeRunner(big), gguf_little.load(str(little)), tok, {2}, "exit")
    ar = bl.generate([1, 7, 8], policy="ar", max_new_tokens=16).token_ids
    assert bl.generate([1, 7, 8], policy="speculative", max_new_tokens=16).token_ids == ar

    gguf_little.save(str(little), dataclasses.replace(recipe, prompt_tokens=True), KEPT.tolist())
    with pytest.raises(BildError, match="head's kept rows"):
        gguf_little.load(str(little))


def test_deltas_merged_into_k_quants_keep_their_type(tmp_path):
    """A healed little of a Q4_K_M file (the 1.5B's own layers): the merged projections stay Q4_K / Q6_K (same
    kernels, same bytes a weight), and each is the file's weight plus b a, up to requantising."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from test_gguf import LIKE_1_5B

    from bild.drafts import gguf as gguf_little

    path = file_pair(tmp_path, LIKE_1_5B)
    model = heal.student(path, [0, 1], KEPT)
    lora = heal.add_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for m in lora.values():
            m.b.normal_(0, 0.5)
    little = tmp_path / "little"
    little.mkdir()
    heal.export(lora, str(little / "deltas.safetensors"))
    recipe = gguf_little.GGUFLittle(model=path, vocab_size=len(KEPT), layers=[0, 1], deltas="deltas.safetensors")
    gguf_little.save(str(little), recipe, KEPT.tolist())
    merged = gguf_little.merged_tensors(str(little), recipe, path, gguf_little.read_deltas(str(little), recipe))
    f = G.read(path)
    assert len(merged) == 2 * 7
    for name, t in merged.items():
        base = f.get(name)
        assert t.kind == base.kind and t.kind in ("Q4_K", "Q6_K") and t.data.nbytes == base.data.nbytes
        at, short = ("0" if name.startswith("blk.0.") else "1"), name.split(".")[2]
        want = dequantize(base.data, GGMLQuantizationType[base.kind]).reshape(base.shape) \
            + lora[f"{at}.{short}"].delta().detach().numpy()
        got = dequantize(t.data, GGMLQuantizationType[t.kind]).reshape(t.shape)
        assert abs(got - want).mean() < 0.1 * abs(want).mean()
    assert {p.kind for w in (gguf_little.load(str(little)).model.layers[0].w2,) for p in (w.parts or (w,))} \
        == {"gguf_q6_k"}


def test_heal_refuses_a_little_it_cannot_train(tmp_path, capsys):
    """`bild draft heal` needs a reduced head, and `--head` a head without the prompt's tokens: one clear error
    (exit 2) before anything loads."""
    from bild.cli import main
    from bild.drafts import gguf as gguf_little

    path = file_pair(tmp_path)
    full = tmp_path / "full"
    gguf_little.save(str(full), gguf_little.GGUFLittle(model=path))
    prompts = tmp_path / "prompts"
    gguf_little.save(str(prompts), gguf_little.GGUFLittle(model=path, vocab_size=len(KEPT), prompt_tokens=True),
                     KEPT.tolist())
    assert main(["draft", "heal", str(tmp_path / "a"), "--little", str(full), "--from", str(tmp_path)]) == 2
    assert "needs a reduced head" in capsys.readouterr().err
    assert main(["draft", "heal", str(tmp_path / "b"), "--little", str(prompts), "--from", str(tmp_path),
                 "--head"]) == 2
    assert "--head trains the head's kept rows" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
