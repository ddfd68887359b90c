"""Train the demo ITM model and captioner on the scene language (CPU, 2 threads, about 12 minutes).

    python -m blip2_search.demo.train [--out DIR]     # default: blip2_search/demo/models/

The BLIP-2 recipe, shrunk:
1. ViT: supervised colour / shape / position heads on the CLS token and on the mean of the patch
   tokens (stands in for BLIP-2's frozen, pre-trained image encoder; the heads are thrown away).
   The renders are mirrored left-right at random, with the position label swapped. Shape, the hard
   attribute (a small circle and square differ by a few pixels at 64 px), gets twice the loss weight,
   and half the pool draws its shape from the small end of the size range.
2. ViT frozen; its tokens are computed once. Q-Former (BLIP-2 stage 1): ITC alone over all 72 captions
   (max over the 32 queries, learned temperature), then ITC + ITM. In each ITC + ITM step, 8 images get
   7 ITM pairs each: its caption; its caption with the colour, the shape and the position changed;
   a caption sampled by ITC similarity (BLIP-2's hard negative); a caption drawn from its ITC top 16
   (what a rerank sees); its caption with an image of a scene one attribute away. That loss (weight 2)
   adds a ranking term: each negative's match logit should stay below the positive's. The next 8
   images are ranked as the rerank ranks them: their caption against their 11 best other captions
   by ITC, scored ITM match logit + ITC, one softmax over the list. Without that list term the ITM
   made confident mistakes on captions two attributes away that ITC ranked below the right one, and
   the ITC -> ITM rerank lost to ITC alone (R@1 0.977 vs 0.988 on 2,000 renders).
3. Captioner (BLIP-2 stage 2): Q-Former started from the stage-1 one, tiny OPT from scratch,
   next-token loss; the ViT blocks are the ITM model's, frozen and byte-identical; its post_layernorm
   trains.
4. Both saved with ``save_pretrained``, reloaded from disk and measured on fresh full-variety renders
   from a seed used nowhere in training (see ``metrics.py`` for the definitions); the numbers, sizes
   and timings go to ``DIR/training_report.json``.

Deterministic for a given thread count: seeded torch / numpy, deterministic algorithms, 2 threads.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # 2 threads on a busy machine: sleep, don't spin

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

from . import architecture as arch  # noqa: E402
from .data import render_eval_images, render_pool  # noqa: E402
from .metrics import evaluate_captioner, evaluate_itm  # noqa: E402
from .objectives import caption_loss, itc_image_embeds, itc_text_embeds, itm_logits, vit_tokens  # noqa: E402
from .scenes import ALL_CAPTIONS, ALL_SCENES, COLORS, POSITIONS, SHAPES  # noqa: E402
from .vocab import bert_tokenizer, caption_tokenizer  # noqa: E402

POOL_SEED = 1001  # training pool
MODEL_SEED = 1002  # initialisation and batch order
EVAL_SEED = 9_000_001  # final metrics; used nowhere in training (tests use another seed again)
THREADS = 2
DEFAULT_OUT = Path(__file__).resolve().parent / "models"

_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
_COLOR = torch.tensor([list(COLORS).index(s.color) for s in ALL_SCENES])
_SHAPE = torch.tensor([SHAPES.index(s.shape) for s in ALL_SCENES])
_POSITION = torch.tensor([POSITIONS.index(s.position) for s in ALL_SCENES])
_MIRRORED_POSITION = {"left": "right", "right": "left", "top": "top", "bottom": "bottom"}
_MIRROR = torch.tensor([s.replace(position=_MIRRORED_POSITION[s.position]).index for s in ALL_SCENES])


@dataclass(frozen=True)
class Recipe:
    """Sizes and schedule of one training run (steps, batch sizes in images, peak learning rates)."""

    pool: int = 24_000  # training renders (ViT)
    small_share: float = 0.5  # of the pool, shapes drawn from 15-22% of the shorter side (else 15-35%)
    qformer_pool: int = 16_000  # the first this many, as cached ViT tokens, for the Q-Former and captioner
    vit_steps: int = 1300
    vit_batch: int = 64
    vit_lr: float = 1e-3
    vit_shape_weight: float = 2.0  # loss weight of the shape heads (colour and position: 1)
    itc_steps: int = 150  # Q-Former, ITC alone
    itc_batch: int = 48
    itc_lr: float = 1e-3
    itm_steps: int = 500  # Q-Former, ITC + ITM
    itm_batch: int = 32  # images for ITC; the first itm_images of them also give 7 ITM pairs each
    itm_images: int = 8
    itm_top_k: int = 16  # one negative caption per image is drawn uniformly from its ITC top k (the rerank's k)
    itm_list_images: int = 8  # the next this many images are ranked against their ITC top captions, as the rerank does:
    itm_list_k: int = 11  # [own caption, the best this many others]
    itm_list_weight: float = 1.0  # + this * cross-entropy of (ITM match logit + ITC) over that list
    itm_lr: float = 2e-3
    itm_weight: float = 2.0  # loss = ITC + itm_weight * ITM (+ the ranking term below)
    itm_rank_weight: float = 1.0  # + this * softplus(negative's match logit - positive's), per image and per caption
    caption_steps: int = 120
    caption_batch: int = 64
    caption_lr: float = 1e-3
    eval_images: int = 500


def _log(msg: str) -> None:
    print(msg, flush=True)


def _pixels(u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> normalised float [B, 3, S, S], as the BLIP image processor computes."""
    return (u8.permute(0, 3, 1, 2).float() / 255.0 - _MEAN) / _STD


def _one_attribute_changes() -> list[list[list[int]]]:
    """[scene id][attribute: colour, shape, position] -> ids of the scenes with only that attribute changed."""
    values = {"color": tuple(COLORS), "shape": SHAPES, "position": POSITIONS}
    return [[[s.replace(**{a: v}).index for v in vs if v != getattr(s, a)] for a, vs in values.items()] for s in ALL_SCENES]


def _sample_changes(changes, sid: torch.Tensor, gen: torch.Generator, attr: int | None = None) -> torch.Tensor:
    """For each scene id, a scene with one attribute changed to a random other value.

    ``attr``: 0 colour, 1 shape, 2 position; None: each scene's attribute chosen uniformly.
    """
    attrs = torch.randint(3, (len(sid),), generator=gen).tolist() if attr is None else [attr] * len(sid)
    picks = torch.rand(len(sid), generator=gen).tolist()
    out = []
    for s, a, u in zip(sid.tolist(), attrs, picks):
        options = changes[s][a]
        out.append(options[int(u * len(options))])
    return torch.tensor(out)


def _schedule(params, lr: float, steps: int, extra=()):
    """AdamW + one-cycle schedule; ``extra``: (params, lr factor) groups without weight decay."""
    groups = [{"params": params, "weight_decay": 0.05}] + [{"params": p, "weight_decay": 0.0} for p, _ in extra]
    max_lr = [lr] + [lr * f for _, f in extra]
    opt = torch.optim.AdamW(groups, lr=lr)
    if steps < 6:  # a smoke run: one-cycle needs a few steps in each phase (2 steps divide by zero)
        for group, peak in zip(opt.param_groups, max_lr):
            group["lr"] = peak
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    warmup = min(0.5, max(0.1, 2.0 / steps))  # at least 2 warm-up steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps, pct_start=warmup)
    return opt, sched


def train_vit(model, images: torch.Tensor, scene_ids: torch.Tensor, recipe: Recipe, gen: torch.Generator) -> nn.Module:
    """Stage 1: the ViT learns colour, shape and position (linear heads, thrown away afterwards)."""
    vm = model.vision_model
    n_out = len(COLORS) + len(SHAPES) + len(POSITIONS)
    # Heads on the CLS token and on the mean of the patch tokens: the second makes the patch tokens
    # themselves carry the attributes, which the Q-Former's queries, attending to all tokens, read at once.
    heads = nn.ModuleList([nn.Linear(vm.config.hidden_size, n_out), nn.Linear(vm.config.hidden_size, n_out)])
    params = list(vm.parameters()) + list(heads.parameters())
    opt, sched = _schedule(params, recipe.vit_lr, recipe.vit_steps)
    vm.train()
    t0, seen, correct = time.time(), 0, torch.zeros(3)
    for step in range(1, recipe.vit_steps + 1):
        idx = torch.randint(len(images), (recipe.vit_batch,), generator=gen)
        flip = torch.rand(recipe.vit_batch, generator=gen) < 0.5
        x = images[idx]
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(2), x)  # mirror left-right: swap the labels too
        sid = torch.where(flip, _MIRROR[scene_ids[idx]], scene_ids[idx])
        states = vm(pixel_values=_pixels(x)).last_hidden_state
        targets = (_COLOR[sid], _SHAPE[sid], _POSITION[sid])
        weights = (1.0, recipe.vit_shape_weight, 1.0)
        loss, cls_hits = 0.0, None
        for feature, head in zip((states[:, 0], states[:, 1:].mean(dim=1)), heads):
            parts = head(feature).split([len(COLORS), len(SHAPES), len(POSITIONS)], dim=1)
            loss = loss + sum(w * F.cross_entropy(part, target) for w, part, target in zip(weights, parts, targets))
            if cls_hits is None:
                cls_hits = torch.stack([(part.argmax(1) == target).sum() for part, target in zip(parts, targets)])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        correct += cls_hits
        seen += len(idx)
        if step % 100 == 0 or step == recipe.vit_steps:
            acc = (correct / seen).tolist()
            _log(
                f"  vit step {step:5d}  loss {loss.item():.3f}  train acc (CLS head) color {acc[0]:.3f} "
                f"shape {acc[1]:.3f} position {acc[2]:.3f}  {time.time() - t0:.0f}s"
            )
            seen, correct = 0, torch.zeros(3)
    vm.eval()
    return heads


@torch.no_grad()
def cache_vit_tokens(vision_model, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Pre-LN ViT tokens of every pool image: float32 [N, 1 + patches, width]."""
    return torch.cat([vit_tokens(vision_model, _pixels(images[i : i + batch])) for i in range(0, len(images), batch)])


def train_qformer(model, tokens: torch.Tensor, scene_ids: torch.Tensor, recipe: Recipe, gen: torch.Generator) -> None:
    """Stage 2 (BLIP-2 stage 1), ViT frozen (tokens precomputed): ITC alone, then ITC + ITM.

    ITC alone first is cheap and quickly aligns queries and text; ITM then gets hard negatives that
    ITC can already tell apart from easy ones. Each phase has its own one-cycle schedule.
    """
    for p in model.vision_model.parameters():
        p.requires_grad_(False)
    text = bert_tokenizer()(list(ALL_CAPTIONS), padding=True, return_tensors="pt")
    ids, mask = text.input_ids, text.attention_mask
    changes = _one_attribute_changes()
    by_scene = [torch.nonzero(scene_ids == s).flatten() for s in range(len(ALL_SCENES))]
    temp = nn.Parameter(torch.tensor(0.07))  # BLIP-2's learned ITC temperature, trained 10x slower
    params = [p for p in model.parameters() if p.requires_grad]
    post_ln = model.vision_model.post_layernorm
    model.train()

    phases = (("itc", recipe.itc_steps, recipe.itc_batch, recipe.itc_lr), ("itc+itm", recipe.itm_steps, recipe.itm_batch, recipe.itm_lr))
    for phase, steps, B, lr in phases:
        with_itm = phase == "itc+itm"
        opt, sched = _schedule(params, lr, steps, extra=[([temp], 0.1)])
        t0, hits, seen, itm_hits, itm_seen, list_hits, list_seen = time.time(), 0, 0, 0, 0, 0, 0
        for step in range(1, steps + 1):
            idx = torch.randint(len(tokens), (B,), generator=gen)
            sid = scene_ids[idx]
            with torch.no_grad():
                temp.clamp_(0.001, 0.5)
                image_embeds = post_ln(tokens[idx])
            img = itc_image_embeds(model, image_embeds)  # [B, 32, D]
            txt = itc_text_embeds(model, ids, mask)  # [72, D]
            sim = torch.einsum("bqd,td->bqt", img, txt).max(dim=1).values  # [B, 72]
            loss_i2t = F.cross_entropy(sim / temp, sid)
            sim_t2i = sim[:, sid].t()  # [B texts (caption of image i), B images]
            same = (sid.view(-1, 1) == sid.view(1, -1)).float()
            loss_t2i = -(same / same.sum(1, keepdim=True) * F.log_softmax(sim_t2i / temp, dim=1)).sum(1).mean()
            loss = (loss_i2t + loss_t2i) / 2
            hits += int((sim.argmax(1) == sid).sum())
            seen += B

            if with_itm:
                n = recipe.itm_images
                with torch.no_grad():  # hard negatives for each of the first n images
                    own = sid[:n]
                    weights = F.softmax(sim[:n] / temp, dim=1)
                    weights[torch.arange(n), own] = 0
                    sampled = torch.multinomial(weights + 1e-9, 1, generator=gen).squeeze(1)
                    top = sim[:n].topk(recipe.itm_top_k + 1, dim=1).indices  # [n, k + 1], own caption among them
                    top_weights = (top != own.view(-1, 1)).float()
                    top_weights[:, -1] *= (top == own.view(-1, 1)).any(dim=1).float()  # exactly k others
                    from_top = top.gather(1, torch.multinomial(top_weights, 1, generator=gen)).squeeze(1)
                    one_attr = [_sample_changes(changes, own, gen, attr) for attr in range(3)]
                    neg_scene = _sample_changes(changes, own, gen).tolist()
                    neg_img = torch.stack([by_scene[s][torch.randint(len(by_scene[s]), (1,), generator=gen)][0] for s in neg_scene])
                    neg_embeds = post_ln(tokens[neg_img])
                # pairs: (image, own caption), (image, caption with its colour / shape / position
                # changed), (image, caption sampled by ITC similarity), (image, caption from its ITC
                # top k, the candidates a rerank sees), (negative image, own caption)
                pair_images = torch.cat([image_embeds[:n]] * 6 + [neg_embeds])
                pair_text = torch.cat([own, *one_attr, sampled, from_top, own])
                labels = torch.cat([torch.ones(n), torch.zeros(6 * n)]).long()
                logits = itm_logits(model, pair_images, ids[pair_text], mask[pair_text])
                loss_itm = F.cross_entropy(logits, labels, weight=torch.tensor([1.0, 6.0]))  # 1 positive : 6 negatives
                loss = loss + recipe.itm_weight * loss_itm
                match = logits[:, 1].view(7, n)  # row 0: the positives
                if recipe.itm_rank_weight:
                    loss = loss + recipe.itm_rank_weight * F.softplus(match[1:] - match[:1]).mean()
                itm_hits += int((match[1:] < match[:1]).sum())
                itm_seen += match[1:].numel()
                if recipe.itm_list_images:
                    # The rerank's task itself: the image's own caption against its ITC top k, scored as
                    # LAVIS reranks (ITM match logit + ITC), one softmax over the list.
                    lo, hi = n, n + recipe.itm_list_images
                    with torch.no_grad():
                        ranked = sim[lo:hi].topk(recipe.itm_list_k + 1, dim=1).indices.tolist()
                        lists = torch.tensor([[o] + [c for c in row if c != o][: recipe.itm_list_k] for o, row in zip(sid[lo:hi].tolist(), ranked)])
                    width = lists.shape[1]
                    list_logits = itm_logits(model, image_embeds[lo:hi].repeat_interleave(width, 0), ids[lists.reshape(-1)], mask[lists.reshape(-1)])
                    scores = list_logits[:, 1].view(-1, width) + sim[lo:hi].detach().gather(1, lists)
                    loss = loss + recipe.itm_list_weight * F.cross_entropy(scores, torch.zeros(len(lists), dtype=torch.long))
                    list_hits += int((scores.argmax(1) == 0).sum())
                    list_seen += len(lists)

            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if step % 50 == 0 or step == steps:
                itm_msg = f"  itm {loss_itm.item():.3f}  itm pairwise {itm_hits / itm_seen:.3f}" if with_itm else ""
                if with_itm and list_seen:
                    itm_msg += f"  list R@1 {list_hits / list_seen:.3f}"
                _log(
                    f"  {phase} step {step:5d}  itc {((loss_i2t + loss_t2i) / 2).item():.3f}{itm_msg}  "
                    f"train R@1 {hits / seen:.3f}  temp {temp.item():.4f}  {time.time() - t0:.0f}s"
                )
                hits = seen = itm_hits = itm_seen = list_hits = list_seen = 0
    model.eval()


def train_captioner(cap, tokens: torch.Tensor, scene_ids: torch.Tensor, recipe: Recipe, gen: torch.Generator) -> None:
    """Stage 3 (BLIP-2 stage 2): Q-Former + projection + OPT + post_layernorm learn to emit the caption."""
    for p in cap.vision_model.parameters():
        p.requires_grad_(False)
    for p in cap.vision_model.post_layernorm.parameters():
        p.requires_grad_(True)
    tok = caption_tokenizer()
    image_token = cap.config.image_token_index
    nq = cap.config.num_query_tokens
    text = tok(list(ALL_CAPTIONS)).input_ids  # each: </s> + 6 words
    seqs = torch.tensor([[image_token] * nq + t + [tok.eos_token_id] for t in text])  # [72, 32 + 8]
    labels_all = seqs.clone()
    labels_all[:, : nq + 1] = -100  # no loss on image tokens or on predicting the bos
    params = [p for p in cap.parameters() if p.requires_grad]
    opt, sched = _schedule(params, recipe.caption_lr, recipe.caption_steps)
    cap.train()
    t0 = time.time()
    for step in range(1, recipe.caption_steps + 1):
        idx = torch.randint(len(tokens), (recipe.caption_batch,), generator=gen)
        sid = scene_ids[idx]
        loss = caption_loss(cap, tokens[idx], seqs[sid], labels_all[sid])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == recipe.caption_steps:
            _log(f"  caption step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    cap.eval()


def _vit_identical(itm_dir: Path, cap_dir: Path) -> bool:
    a, b = load_file(itm_dir / "model.safetensors"), load_file(cap_dir / "model.safetensors")
    keys = [k for k in a if k.startswith(("vision_model.embeddings.", "vision_model.encoder."))]
    return bool(keys) and all(k in b and torch.equal(a[k], b[k]) for k in keys)


def run(out: Path, recipe: Recipe, workers: int = THREADS) -> dict:
    """Train both models into ``out/itm`` and ``out/captioner``, evaluate them from disk; returns the report.

    Runs with THREADS torch threads, deterministic kernels and fixed seeds; the caller's settings are
    restored afterwards."""
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(MODEL_SEED)
    try:
        return _run(out, recipe, workers)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.random.set_rng_state(rng)


def _run(out: Path, recipe: Recipe, workers: int) -> dict:
    gen = torch.Generator().manual_seed(MODEL_SEED)
    timings: dict[str, float] = {}
    start = t = time.time()

    def lap(name: str) -> None:
        nonlocal t
        now = time.time()
        timings[name] = round(now - t, 1)
        _log(f"[{name}] {now - t:.0f}s (total {now - start:.0f}s)")
        t = now

    _log(f"rendering {recipe.pool} training images ({workers} processes)")
    pool_u8, pool_ids = render_pool(recipe.pool, POOL_SEED, arch.IMAGE_SIZE, workers=workers, small_share=recipe.small_share)
    images, scene_ids = torch.from_numpy(pool_u8), torch.from_numpy(pool_ids)
    lap("render pool")
    missing = len(ALL_SCENES) - len(set(pool_ids[: recipe.qformer_pool].tolist()))
    if recipe.itm_steps and missing:  # checked before any training: ITM negatives need every scene
        raise ValueError(f"the Q-Former pool has no image of {missing} of the {len(ALL_SCENES)} scenes, which ITM negatives need; "
                         "raise --qformer-pool (and --pool)")

    itm = arch.new_itm_model(MODEL_SEED)
    _log(f"ITM model: {arch.count_parameters(itm):,} parameters; stage 1: ViT supervised heads")
    train_vit(itm, images, scene_ids, recipe, gen)
    lap("vit")

    tokens = cache_vit_tokens(itm.vision_model, images[: recipe.qformer_pool])
    scene_ids = scene_ids[: recipe.qformer_pool]
    del images
    lap("cache vit tokens")

    _log("stage 2: Q-Former ITC + ITM (ViT frozen)")
    train_qformer(itm, tokens, scene_ids, recipe, gen)
    arch.save_itm_model(itm, out / "itm")
    lap("qformer")

    cap = arch.new_captioner(MODEL_SEED)
    arch.copy_vision_tower(itm, cap)
    arch.copy_query_path(itm, cap)
    _log(f"captioner: {arch.count_parameters(cap):,} parameters; stage 3: caption loss (ViT blocks frozen)")
    train_captioner(cap, tokens, scene_ids, recipe, gen)
    arch.save_captioner(cap, out / "captioner")
    lap("captioner")
    del tokens

    _log(f"evaluating the saved models on {recipe.eval_images} fresh full-variety renders (seed {EVAL_SEED})")
    eval_images, eval_ids = render_eval_images(recipe.eval_images, EVAL_SEED, workers=workers)
    metrics = evaluate_itm(out / "itm", eval_images, eval_ids, negatives_seed=EVAL_SEED)
    metrics = metrics.merge(evaluate_captioner(out / "captioner", eval_images, eval_ids))
    lap("evaluate")

    report = {
        "metrics": metrics.as_dict(),
        "eval_seed": EVAL_SEED,
        "vit_byte_identical": _vit_identical(out / "itm", out / "captioner"),
        "size_mb": {"itm": round(arch.sizes_mb(out / "itm"), 2), "captioner": round(arch.sizes_mb(out / "captioner"), 2)},
        "parameters": {"itm": arch.count_parameters(itm), "captioner": arch.count_parameters(cap)},
        "recipe": recipe.__dict__,
        "threads": THREADS,
        "timings_s": timings,
        "wall_s": round(time.time() - start, 1),
        "torch": torch.__version__,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2_search.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    for name, value in Recipe().__dict__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    recipe = Recipe(**{k: getattr(args, k) for k in Recipe().__dict__})
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    report = run(args.out, recipe)
    _log(json.dumps({k: report[k] for k in ("metrics", "vit_byte_identical", "size_mb", "wall_s")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
