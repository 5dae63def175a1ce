"""RL prompts from the VST data (trainer.data.vst): verifiable questions of every VST skill, single
image, multiple views and video, mixed as a VSTConfig states; a prompt source for trainer.rl
(trainer.rl.prompts.PromptSource), used by the ``vst`` recipe (trainer.rl.vst).

Prompt ``(seed, stream, index)`` draws from ``np.random.default_rng([seed, stream, index])``: first
whether it is a general prompt (probability ``general_frac``: a spatial scene to describe, scored
by the reward model as trainer.rl.prompts' general prompts), else its skill by the config's mix,
then the question (trainer.data.vst.generate). The streams are trainer.rl.prompts' (RL,
curation, rejection sampling), three-number keys that neither the VST training samples
(rng([seed, i])), their held-out questions (rng([seed + offset, k, i])) nor the baselines' fit
(rng([seed, 7, k, i])) draw. Views and videos travel in the prompt's ``parts``; a video's Media
carries its task, so the sampler takes the report's FPS for it, in rollouts as in training.
"""

from __future__ import annotations

import numpy as np

from ..data import spatial, vst
from .prompts import DESCRIBE, DESCRIBE_QUESTION, Prompt, describe


class VSTPrompts:
    """A prompt source over the VST skills with ``cfg``'s mix (its ``think_prob`` is not used: a
    prompt has no answer)."""

    def __init__(self, cfg: vst.VSTConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else vst.VSTConfig()
        mix = self.cfg.mix()
        self._skills = list(mix)
        self._p = np.asarray(list(mix.values()), dtype=np.float64)
        self._p /= self._p.sum()

    @classmethod
    def from_spec(cls, spec: str) -> VSTPrompts:
        """The source of a VST data spec string (trainer.data.vst.parse_spec)."""
        return cls(vst.parse_spec(spec))

    def __call__(self, seed: int, stream: int, index: int, general_frac: float) -> Prompt:
        rng = np.random.default_rng([seed, stream, index])
        key = (seed, stream, index)
        if rng.random() < general_frac:
            scene = spatial.sample_scene(rng, self.cfg.spatial)
            return Prompt(DESCRIBE, DESCRIBE_QUESTION, describe(scene), scene.image, key)
        skill = str(rng.choice(self._skills, p=self._p))
        s = vst.generate(skill, rng, self.cfg)
        return Prompt(skill, s.question, s.answer, s.image, key, parts=s.parts)
