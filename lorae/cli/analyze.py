"""``lorae analyze``: diversity and weight-space analysis of a trained ensemble.

    lorae analyze --config run/config.yaml --ckpt_path run/checkpoints/best.ckpt --output_dir out

Builds the model and data module from the config (as ``lorae test`` does: a full checkpoint
holds every weight, so no pretrained weights are downloaded; an adapter-only checkpoint,
``model.checkpoint: adapters``, needs the pretrained backbone it was trained on), runs the
chosen split, and writes:

- ``analysis.json``: per-member and ensemble accuracy, the ensemble-size curve, the mean
  disagreement, Jensen-Shannon divergence (bits; ``jsd_bits`` the paper's statistic between
  the members' softmaxes aggregated over the samples, ``jsd_per_sample_bits`` the mean
  per-sample one) and mutual information (nats), their pairwise matrices, the t-SNE
  coordinates, per projection the weight-space numbers (:mod:`lorae.analysis.weights`: top-k
  singular values, the k x k singular-vector cosine heatmaps of appendix D, k = ``--top_k``,
  16 as in the paper) and the appendix E diversity score (``diversity_score_v`` of the
  members' value updates ``W_i - W0``, ``diversity_score_v_weights`` of their whole value
  matrices ``W_i``: the appendix does not say which), and (when the run recorded one
  with :class:`lorae.evaluation.WeightTrajectory`) the t-SNE of the weight trajectory;
- ``weight_space.csv``: one row per projection (block.q/k/v/o) with the summary numbers;
- ``ensemble_size.csv``;
- figures (``--plots``, default when matplotlib is installed): ``disagreement.png``,
  ``jsd.png``, ``tsne.png`` (M >= 3), ``ensemble_size.png``, ``weight_similarity.png``
  (member-vs-member subspace similarity, mean over projections), ``pretrained_similarity.png``,
  ``delta_singular_values.png``, ``singular_values.png`` (top-k singular values per
  projection kind, pretrained and members), ``member_cosines_<q|k|v|o>.png`` (Fig. 3, 12),
  ``pretrained_cosines_<q|k|v|o>.png`` (Fig. 13) and ``delta_cosines_<q|k|v|o>.png``
  (Fig. 14), each the mean over layers; and ``weight_trajectory.png`` (Fig. 15) with a
  trajectory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lorae.analysis.embedding import tsne_embedding
from lorae.analysis.trajectory import TRAJECTORY_FILE, load_trajectory, trajectory_embedding
from lorae.analysis.weights import analyse_projection, diversity_score
from lorae.errors import ConfigError, DataNotFoundError
from lorae.evaluation.collect import collect_member_logits
from lorae.evaluation.figures import (
    ensemble_size_figure,
    heatmap_figure,
    matplotlib_available,
    require_pyplot,
    save_figure,
    scatter_figure,
    singular_values_figure,
)
from lorae.evaluation.report import write_table
from lorae.metrics.diversity import (
    disagreement_matrix,
    jensen_shannon_matrix,
    per_sample_jensen_shannon_matrix,
)
from lorae.metrics.ensemble_size import first_k_log_probs
from lorae.metrics.functional import (
    expected_calibration_error,
    mutual_information,
    predictive_log_probs,
)

__all__ = ["analyze_logits", "analyze_trajectory", "analyze_weights", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorae analyze",
        description="Function-space diversity and weight-space analysis of a trained ensemble "
        "(paper section 4, appendices D and E). Extra --key=value options are passed to the "
        "config like in `lorae test`.",
    )
    parser.add_argument("--config", action="append", required=True, help="config file(s)")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint to analyse")
    parser.add_argument("--output_dir", required=True, type=Path, help="where to write")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--max_samples", type=int, default=2000, help="samples to run")
    parser.add_argument(
        "--top_k", type=int, default=16, help="singular vectors compared (paper: 16)"
    )
    parser.add_argument(
        "--trajectory",
        type=Path,
        default=None,
        help=f"a {TRAJECTORY_FILE} to draw (default: the one in the checkpoint's run folder)",
    )
    parser.add_argument("--intruder_threshold", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="t-SNE random state")
    parser.add_argument(
        "--plots",
        choices=("auto", "true", "false"),
        default="auto",
        help="draw figures (auto: when matplotlib is installed)",
    )
    return parser


def analyze_logits(logits: Tensor, target: Tensor, seed: int = 0) -> dict[str, Any]:
    """Function-space numbers of member logits ``(M, N, C)`` with targets ``(N,)``."""
    num_members = logits.shape[0]
    log_probs = predictive_log_probs(logits)
    sizes = first_k_log_probs(logits)
    disagreement = disagreement_matrix(logits)
    jsd = jensen_shannon_matrix(logits)
    jsd_per_sample = per_sample_jensen_shannon_matrix(logits)
    pairs = max(num_members * (num_members - 1), 1)
    result: dict[str, Any] = {
        "num_samples": int(target.shape[0]),
        "num_members": num_members,
        "accuracy": float((log_probs.argmax(-1) == target).double().mean()),
        "member_accuracy": (logits.argmax(-1) == target).double().mean(dim=1).tolist(),
        "ensemble_size": [
            {
                "k": k + 1,
                "acc": float((sizes[k].argmax(-1) == target).double().mean()),
                "ece": float(expected_calibration_error(sizes[k].exp(), target)),
            }
            for k in range(num_members)
        ],
        "disagreement": float(disagreement.sum() / pairs),
        "jsd_bits": float(jsd.sum() / pairs),
        "jsd_per_sample_bits": float(jsd_per_sample.sum() / pairs),
        "mutual_information_nats": float(mutual_information(logits).mean()),
        "disagreement_matrix": disagreement.tolist(),
        "jsd_matrix": jsd.tolist(),
        "jsd_per_sample_matrix": jsd_per_sample.tolist(),
    }
    if num_members >= 3:
        result["tsne"] = tsne_embedding(logits, seed=seed).tolist()
    return result


def analyze_weights(
    weights: dict[str, tuple[Tensor, Tensor]], top_k: int, threshold: float
) -> dict[str, Any]:
    """Weight-space numbers of every projection and the appendix E diversity score."""
    projections: dict[str, Any] = {}
    for key, (reference, members) in weights.items():
        report = analyse_projection(reference, members, top_k, threshold)
        projections[key] = {
            **report.summary(),
            "pretrained_similarity_per_member": report.pretrained_similarity.tolist(),
            "member_similarity_matrix": report.member_similarity.tolist(),
            "intruders_per_member": report.intruders.tolist(),
            "delta_singular_values": report.delta_singular_values[:, : 2 * top_k].tolist(),
            "pretrained_top_singular_values": report.pretrained_singular_values[:top_k].tolist(),
            "top_singular_values": report.top_singular_values.tolist(),
            "pretrained_cosines": report.pretrained_cosines.tolist(),
            "member_cosines": report.member_cosines.tolist(),
            "delta_member_cosines": report.delta_member_cosines.tolist(),
        }
    result: dict[str, Any] = {"projections": projections}
    try:  # appendix E does not say which matrices it correlates: both readings
        result["diversity_score_v"] = diversity_score(weights, "v", of="updates")
        result["diversity_score_v_weights"] = diversity_score(weights, "v", of="weights")
    except ValueError as error:
        result["diversity_score_v"] = result["diversity_score_v_weights"] = None
        result["diversity_score_note"] = str(error)
    return result


def analyze_trajectory(path: Path, seed: int = 0) -> dict[str, Any]:
    """The t-SNE of a recorded weight trajectory, one embedding per layer (appendix D,
    Fig. 15): point 0 is the pretrained weights, point ``1 + s*M + i`` member i at
    snapshot s."""
    saved = load_trajectory(path)
    layers = {
        key: trajectory_embedding(snapshots, seed).tolist()
        for key, snapshots in saved["snapshots"].items()
    }
    return {
        "file": str(path),
        "projection": saved["projection"],
        "epochs": list(saved["epochs"]),
        "num_members": int(saved["num_members"]),
        "layers": layers,
    }


def _trajectory_path(args: argparse.Namespace) -> Path | None:
    if args.trajectory is not None:
        if not args.trajectory.is_file():
            raise DataNotFoundError(f"Trajectory file '{args.trajectory}' does not exist.")
        path: Path = args.trajectory
        return path
    checkpoint = Path(args.ckpt_path).resolve()
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / TRAJECTORY_FILE).is_file():
            return folder / TRAJECTORY_FILE
    return None


def _trajectory_figure(trajectory: dict[str, Any]) -> Any:
    plt = require_pyplot()
    layers = trajectory["layers"]
    m, epochs = trajectory["num_members"], trajectory["epochs"]
    columns = min(4, len(layers))
    rows = -(-len(layers) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.0 * rows), squeeze=False)
    colors = plt.get_cmap("tab20")
    for axis, (key, coords) in zip(axes.flat, layers.items(), strict=False):
        points = np.asarray(coords)
        path = points[1:].reshape(len(epochs), m, 2)
        for i in range(m):
            axis.plot(path[:, i, 0], path[:, i, 1], "-o", ms=2, lw=0.8, color=colors(i % 20))
        axis.scatter(*points[0], marker="*", s=120, color="black", zorder=3, label="pretrained")
        axis.set_title(key, fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
    for axis in list(axes.flat)[len(layers) :]:
        axis.set_visible(False)
    figure.suptitle(f"t-SNE of member weights, epochs {epochs[0]}..{epochs[-1]} (star: pretrained)")
    return figure


def _mean_heatmaps(projections: dict[str, Any], field: str) -> dict[str, np.ndarray]:
    """``field``'s k x k matrices averaged over layers, per projection kind (q, k, v, o)."""
    kinds: dict[str, list[Any]] = {}
    for key, values in projections.items():
        kinds.setdefault(key.rsplit(".", 1)[-1], []).append(values[field])
    return {kind: np.nanmean(np.asarray(found), axis=0) for kind, found in kinds.items()}


def _build(configs: list[str], ckpt_path: str, overrides: list[str]) -> tuple[Any, Any]:
    """The model (checkpoint loaded) and data module of a config, built like `lorae test`
    (through the one :func:`~lorae.cli.main.build_cli`)."""
    from lorae.checkpoints.safe import load_checkpoint_safely
    from lorae.cli.main import build_cli

    if not Path(ckpt_path).is_file():
        raise DataNotFoundError(f"Checkpoint '{ckpt_path}' does not exist.")
    args = [a for c in configs for a in ("--config", c)] + overrides
    cli = build_cli(args, run=False, load_from=ckpt_path, save_config=False)
    checkpoint = load_checkpoint_safely(ckpt_path)
    cli.model.on_load_checkpoint(checkpoint)  # identity check; fills an adapter-only one
    cli.model.load_state_dict(checkpoint["state_dict"])
    return cli.model, cli.datamodule


def _figures(result: dict[str, Any], out: Path) -> list[Path]:
    require_pyplot()
    written = []
    m = result["num_members"]
    labels = [str(i) for i in range(m)]
    written.append(
        save_figure(
            heatmap_figure(np.array(result["disagreement_matrix"]), "Pairwise disagreement rate"),
            out / "disagreement.png",
        )
    )
    written.append(
        save_figure(
            heatmap_figure(np.array(result["jsd_matrix"]), "Pairwise Jensen-Shannon div. (bits)"),
            out / "jsd.png",
        )
    )
    if "tsne" in result:
        figure = scatter_figure(np.array(result["tsne"]), labels, "t-SNE of member predictions")
        written.append(save_figure(figure, out / "tsne.png"))
    rows = result["ensemble_size"]
    series = {k: [r[k] for r in rows] for k in ("acc", "ece")}
    figure = ensemble_size_figure([r["k"] for r in rows], series)
    written.append(save_figure(figure, out / "ensemble_size.png"))
    projections = result.get("weights", {}).get("projections", {})
    if projections:
        mean_similarity = np.mean(
            [p["member_similarity_matrix"] for p in projections.values()], axis=0
        )
        figure = heatmap_figure(mean_similarity, "Member subspace similarity (mean over layers)")
        written.append(save_figure(figure, out / "weight_similarity.png"))
        plt = require_pyplot()
        figure, axes = plt.subplots(figsize=(max(4.0, 0.25 * len(projections)), 3.2))
        names = list(projections)
        values = [p["pretrained_similarity"] for p in projections.values()]
        axes.bar(range(len(names)), values, color="tab:blue")
        axes.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        axes.set_ylim(0, 1.05)
        axes.set_ylabel("top-k similarity to pretrained")
        axes.set_title("Pretrained vs member singular subspace (mean over members)")
        written.append(save_figure(figure, out / "pretrained_similarity.png"))
        shown = names[-4:]  # the last block's projections
        figure = singular_values_figure(
            {k: np.array(projections[k]["delta_singular_values"]) for k in shown},
            "Singular values of the member updates W_i - W_0 (= B_i A_i for LoRA)",
        )
        written.append(save_figure(figure, out / "delta_singular_values.png"))
        spectra = {
            f"{kind} pretrained": np.nanmean(
                [p["pretrained_top_singular_values"] for k, p in projections.items()
                 if k.endswith("." + kind)], axis=0,
            )[None]
            for kind in sorted({k.rsplit(".", 1)[-1] for k in projections})
        }  # fmt: skip
        for kind, spectrum in _mean_heatmaps(projections, "top_singular_values").items():
            spectra[f"{kind} members"] = spectrum
        figure = singular_values_figure(spectra, "Top singular values (mean over layers)")
        written.append(save_figure(figure, out / "singular_values.png"))
        titles = {
            "member_cosines": ("member_cosines", "members i vs j"),
            "pretrained_cosines": ("pretrained_cosines", "pretrained vs member"),
            "delta_member_cosines": ("delta_cosines", "updates W_i - W0, members i vs j"),
        }
        for field, (name, what) in titles.items():
            for kind, matrix in _mean_heatmaps(projections, field).items():
                title = f"|cos| of top singular vectors, {what} ({kind}, mean over layers)"
                axis = ("singular vector a", "singular vector b")
                figure = heatmap_figure(matrix, title, axis_labels=axis)
                written.append(save_figure(figure, out / f"{name}_{kind}.png"))
    if "trajectory" in result:
        figure = _trajectory_figure(result["trajectory"])
        written.append(save_figure(figure, out / "weight_trajectory.png"))
    return written


def main(argv: list[str]) -> int:
    """Entry point of ``lorae analyze``."""
    args, overrides = _parser().parse_known_args(argv)
    draw = matplotlib_available() if args.plots == "auto" else args.plots == "true"
    if draw:
        require_pyplot()  # fail before the (slow) model pass
    model, datamodule = _build(args.config, args.ckpt_path, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    datamodule.setup("test")
    loader = datamodule.val_dataloader() if args.split == "val" else datamodule.predict_dataloader()

    def to_device(batch: Any) -> Any:
        inputs, target = batch
        if isinstance(inputs, dict):
            return {k: v.to(device) for k, v in inputs.items()}, target
        return inputs.to(device), target

    logits, target = collect_member_logits(model, loader, to_device, args.max_samples)
    result = analyze_logits(logits, target, args.seed)
    result["split"] = args.split
    result["checkpoint"] = args.ckpt_path
    try:
        weights = model.method.member_weights()
    except ConfigError as error:
        result["weights_note"] = str(error)
    else:
        result["weights"] = analyze_weights(weights, args.top_k, args.intruder_threshold)
    trajectory = _trajectory_path(args)
    if trajectory is not None:
        result["trajectory"] = analyze_trajectory(trajectory, args.seed)
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(result, indent=2) + "\n")
    written = [out / "analysis.json"]
    written += write_table(out / "ensemble_size", result["ensemble_size"])
    projections = result.get("weights", {}).get("projections", {})
    if projections:
        rows = [
            {"projection": k, **{n: v for n, v in p.items() if not isinstance(v, list)}}
            for k, p in projections.items()
        ]
        written += write_table(out / "weight_space", rows)
    if draw:
        written += _figures(result, out)
    print(
        f"{args.split}: {result['num_samples']} samples, accuracy {result['accuracy']:.4f}, "
        f"disagreement {result['disagreement']:.4f}, JSD {result['jsd_bits']:.4f} bits "
        f"(per sample {result['jsd_per_sample_bits']:.4f}), "
        f"MI {result['mutual_information_nats']:.4f} nats"
    )
    if "weights" in result:
        weights = result["weights"]
        print(
            f"appendix E diversity score (v): {weights['diversity_score_v']} of the updates "
            f"W_i - W0, {weights['diversity_score_v_weights']} of the matrices W_i"
        )
    print("Written: " + ", ".join(str(p) for p in written))
    return 0
