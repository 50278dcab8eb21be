"""Adaptive semantic space learning: embed, cluster, redistribute, one LoRA expert per cluster, route.

Modules (pure math apart from the last three):
  samples.py       instruction / chat samples, JSONL reading with file:line errors, shards
  tokenize.py      chat template -> input ids + labels on assistant tokens only
  embed.py         model mean-pooled hidden states or a sentence-transformers encoder, cached on disk
  cluster.py       k-means on the unit sphere, K given or chosen by silhouette
  density.py       k-NN radius and an adaptive DBSCAN whose eps comes from the data
  redistribute.py  budget allocation with floors and weighted sampling (dense thinned, tail kept)
  router.py        nearest centroid by cosine, top-1 or top-k blend weights
  need.py          the model's own need for a sample: response loss or IFD
  lora.py          peft adapters, one per expert, and the training loop
  routed.py        routed evaluation and generation over a model carrying all experts

Nothing here imports hydra, so scripts on machines without it can use these modules.
"""
