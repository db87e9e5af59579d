"""Concepts: what a layer represents beyond its channels (issue 24).

A layer's activations over the exemplar folder (`samples`: vectors at sampled positions,
bounded in memory) give two kinds of units beside its channels, both directions over the
layer's channels that a `direction` objective (atlas.optim.objectives) visualizes:

- a concept dictionary (`dictionary`): K concepts learned by NMF where the activations are
  non-negative, else by a TopK sparse autoencoder (`sae`); `describe` gives each concept's
  share, top channels, exemplars and where it fires;
- an activation atlas (`grid`): UMAP of the vectors to 2D, an N x N grid, each cell's mean.

scikit-learn and umap-learn are the `concepts` extra, imported only where they are needed.
"""
