"""Ask a trained model about images or a video from the command line.

    python -m trainer.chat runs/vlm-seedvl-tiny --image scene.png "How many cubes are there?"
    python -m trainer.chat runs/x --video frames/ --fps 2 "Which object moves?"
    python -m trainer.chat runs/x --image a.png "Describe it." --temperature 0.7 --top-p 0.9 --seed 1

The checkpoint is loaded as trainer.evaluate loads it (a run directory's latest, or a checkpoint
directory), and the question is encoded as training encodes it: the same chat template, image
preprocessing and image budget (trainer.data.chat), so the reply is what evaluation would score.
Greedy by default (model.generate, as evaluation); with --temperature > 0 the next token is sampled
from the smallest set of tokens whose probability reaches --top-p (nucleus sampling), seeded by
--seed. A video is a directory of frame images or a .npy/.npz array of (N, H, W, 3) uint8 frames,
at --fps source frames per second, or an animated GIF, whose frame durations give its rate.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model.generate import KVCache, decode_step, generate
from model.vlm import SeedVLM

from .data import tokenizer as T
from .data.chat import Conversation, Media, SampleError, Turn, encode_conversation
from .evaluate import CheckpointError, Loaded, decode_reply, device_arg, load_checkpoint, packed_images


@torch.no_grad()
def sample(
    model: SeedVLM, prompt: torch.Tensor, max_new_tokens: int, *, eos_id: int, images=None,
    temperature: float, top_p: float = 1.0, vocab_size: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """Sampled continuation of one prompt ((L,) int64 token ids), up to ``max_new_tokens`` tokens or
    ``eos_id`` (kept): softmax(logits / temperature) restricted to the top-p nucleus. Ids from
    ``vocab_size`` on (embedding rows no text maps to) are never drawn. Returns (n,) int64."""
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"sample: expected temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    llm = model.llm
    cfg, weight = llm.cfg, llm.embed.weight
    cache = KVCache(
        cfg.num_layers, 1, prompt.numel() + max_new_tokens, cfg.num_kv_heads, cfg.head_dim,
        dtype=weight.dtype, device=weight.device,
    )  # fmt: skip
    visual = None
    if images is not None:
        visual = model.encode_images(images.patches, images.pos_hw, images.cu_seqlens, images.max_seqlen)
    logits = decode_step(llm, cache, model.embed(prompt.to(weight.device), visual), [prompt.numel()])
    out: list[int] = []
    for _ in range(max_new_tokens):
        scaled = logits[0].float() / temperature
        if vocab_size is not None:
            scaled[vocab_size:] = float("-inf")
        probs, order = torch.softmax(scaled, -1).sort(descending=True)
        # Keep the tokens whose preceding mass is below top_p: the nucleus, never empty.
        probs[probs.cumsum(0) - probs >= top_p] = 0
        token = int(order[int(torch.multinomial(probs.cpu(), 1, generator=generator))])
        out.append(token)
        if token == eos_id:
            break
        logits = decode_step(llm, cache, llm.embed(torch.tensor([token], device=weight.device)), [1])
    return torch.tensor(out, dtype=torch.int64)


def load_gif(path: Path) -> tuple[np.ndarray, float]:
    """(N, H, W, 3) uint8 frames of an animated GIF and its frame rate (from its frame durations;
    10 fps when it gives none)."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    frames, durations = [], []
    try:
        with Image.open(path) as gif:
            for frame in ImageSequence.Iterator(gif):
                frames.append(np.array(frame.convert("RGB")))
                durations.append(frame.info.get("duration") or 100)
    except FileNotFoundError:
        raise SampleError(f"video {str(path)!r} not found", "missing media") from None
    except (UnidentifiedImageError, OSError) as err:
        raise SampleError(f"cannot decode GIF {str(path)!r}: {err}", "corrupt media") from None
    return np.stack(frames), 1000.0 / float(np.mean(durations))


def ask(
    loaded: Loaded, question: str, *, device: torch.device, images: Sequence[Path] = (),
    video: Path | None = None, fps: float = 1.0, max_new_tokens: int = 64, temperature: float = 0.0,
    top_p: float = 1.0, seed: int = 0,
) -> str:  # fmt: skip
    """The model's reply to ``question`` about ``images`` (files) and ``video``; SampleError when a
    medium cannot be read."""
    media = [Media("image", str(p)) for p in images]
    if video is not None:
        if video.suffix.lower() == ".gif":
            frames, fps = load_gif(video)
            media.append(Media("video", frames, fps))
        else:
            media.append(Media("video", str(video), fps))
    conv = Conversation((Turn("user", (*media, question)),), "command line")
    prompt = encode_conversation(conv, loaded.tok, loaded.encode, add_generation_prompt=True)
    ids = torch.from_numpy(prompt.ids).long()
    pixels = packed_images(prompt.images, device)
    eos = loaded.tok.special_id(T.IM_END)
    if temperature == 0:
        out = generate(loaded.model, [ids], max_new_tokens, eos_id=eos, images=pixels)[0]
    else:
        out = sample(
            loaded.model, ids, max_new_tokens, eos_id=eos, images=pixels, temperature=temperature,
            top_p=top_p, vocab_size=loaded.tok.vocab_size, generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
    return decode_reply(loaded.tok, out.tolist())


def main(argv: list[str] | None = None) -> int:
    # fmt: off
    p = argparse.ArgumentParser(
        prog="python -m trainer.chat",
        description="Ask a trained model a question about images or a video; prints its reply.",
    )
    add = p.add_argument
    add("checkpoint", type=Path,
        help="a run directory (its latest checkpoint) or a checkpoints/step_* directory")
    add("question", help="the question, e.g. 'How many cubes are there?'")
    add("--image", type=Path, action="append", default=[], help="an image file (repeat for several)")
    add("--video", type=Path,
        help="a directory of frame images, a .npy/.npz array of (N, H, W, 3) uint8 frames, or a GIF")
    add("--fps", type=float, default=1.0, help="source frames per second of --video (1; a GIF's own)")
    add("--max-new-tokens", type=int, default=64, help="longest reply in tokens (64)")
    add("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    add("--top-p", type=float, default=1.0, help="nucleus sampling: the top tokens of this mass (1.0)")
    add("--seed", type=int, default=0, help="sampling seed (0)")
    add("--device", type=device_arg, default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    add("--max-pixels", type=int, help="per-image pixel budget (default: the run's)")
    # fmt: on
    a = p.parse_args(argv)
    if a.max_new_tokens < 1:
        p.error(f"--max-new-tokens: expected >= 1, got {a.max_new_tokens}")
    if a.temperature < 0 or not 0 < a.top_p <= 1:
        p.error(f"--temperature: expected >= 0 and --top-p in (0, 1], got {a.temperature} and {a.top_p}")
    if a.fps <= 0:
        p.error(f"--fps: expected > 0, got {a.fps}")
    try:
        loaded = load_checkpoint(a.checkpoint, a.device, max_pixels=a.max_pixels)
        reply = ask(
            loaded, a.question, images=a.image, video=a.video, fps=a.fps, max_new_tokens=a.max_new_tokens,
            temperature=a.temperature, top_p=a.top_p, seed=a.seed, device=a.device,
        )  # fmt: skip
    except (CheckpointError, SampleError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
