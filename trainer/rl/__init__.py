"""Post-training by reinforcement learning (Seed1.5-VL §4.2-4.5): verifiers and a generative reward
model, a critic shared by both reward sources, PPO with per-prompt-type KL, prompt curation and
rejection-sampling fine-tuning rounds.

    ppo.py           GAE, the clipped policy and value losses, the KL reward term (pure maths)
    rewards.py       response format, verifiers (IoU, point, exact, closeness), repetition filter
    workers.py       verifiers in worker processes with a timeout
    reward_model.py  the generative RM: judge prompts, P("yes") scores, list-wise preference training
    prompts.py       general and verifiable prompts from the embedded spatial data, curation
    vst_prompts.py   verifiable prompts of every VST skill (single image, multi-view, video)
    rollout.py       sampling rollouts and scoring them; packed forwards for log-probs and values
    episode.py       the PPO episode: advantages, mini-batch steps of actor and critic
    run.py           the recipes ``rl`` and ``post`` (RM stage, RL, rejection-sampling rounds)
    vst.py           the recipe ``vst``: SFT on VST-P, SFT on VST-R, then RL on VST prompts
"""
