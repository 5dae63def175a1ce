"""SeedViT pre-training (Seed1.5-VL §2.1.2, Table 2) and its zero-shot evaluation (§6.1.1).

``python trainer/run.py --recipe vit`` runs the three stages on the embedded rendered scenes:

1. ``vit_mim``: masked image modelling -- 75% of each image's patches masked at native
   resolution, the kept patches encoded with their own 2D RoPE positions (packed through
   ``varlen_attention``), a one-block decoder predicting the targets at the masked places, cosine
   loss. Targets: a frozen Hugging Face vision tower (``--teacher PATH``: CLIP, SigLIP or a
   Qwen2-VL vision tower) or, without one, HOG (MaskFeat) and each patch's mean colour, so the
   stage runs with no weights.
2. ``vit_contrastive``: native-resolution image-text pairs; attention-pooling head on the ViT, a
   small text encoder; SigLIP's sigmoid loss plus SuperClass (bag-of-subword classification of the
   caption). Captions come from the rendered scene (objects, colours, counts, relations) or, with
   ``--data my.jsonl``, from the manifest.
3. ``vit_video``: video-text alignment; the renderer moves an object (or the camera) between
   frames, the dynamic frame-resolution sampler picks the frames, and the caption says what moves
   where. Audio is out of scope: the paper's omni-modal stage (MiCo) also encodes audio and aligns
   audio captions; there is no audio here, so this stage aligns frames and visual captions only.

``--recipe full`` runs these, then the VLM stages 0 -> 1 -> 2 -> SFT from the pre-trained ViT;
``--vit-init RUN`` starts any VLM recipe from a ViT pre-training run's ViT.

Modules: ``data`` (banks, captions, caption tokens), ``losses`` (masking, HOG, MIM, SigLIP,
SuperClass, the cross-rank gather), ``teacher`` (MIM targets), ``zeroshot`` (the evaluation),
``export`` (the ViT on disk), ``loop`` (the runner and the ``full`` recipe). The heads are in
model.vit_heads.
"""
