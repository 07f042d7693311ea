"""`digin directions`: a class's feature directions by neural PCA (Neuhaus et al., "Spurious
Features Everywhere", ICCV 2023), the paper's third way of reading a classifier.

For class k with last-layer weights w_k (D,) and penultimate features phi(x) (D,), each
image of the class contributes a(x) = w_k * phi(x) (elementwise; sum_i a_i(x) + b_k is
the class logit). Ordinary PCA of these contributions over the class's images gives a
mean mu and components v_l (unit eigenvectors of their covariance, largest eigenvalue
first). Component l's activation on any image is

    alpha_l(x) = <a(x) - mu, v_l> * s_l,   s_l = sum_i v_l,i,

its share of the class logit: sum_l alpha_l(x) = logit_k(x) - logit_k(mu) - b_k, and it
is unchanged when v_l flips sign. Since alpha_l is linear in phi, the feature-space
direction d_l = s_l * (w_k * v_l) gives <phi(x), d_l> = alpha_l(x) + s_l <mu, v_l>: the
file `digin neuron --direction` / `digin neuron-cf --direction` maximizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from digin_cli.drawing import labelled_sheet
from digin_cli.errors import DiginError
from digin_cli.io import ImageReadError, list_images, load_image, save_png, save_vector_file, write_json
from digin_cli.models import load_classifier
from digin_cli.models.classifiers import Classifier
from digin_cli.tasks.neuron_target import class_head
from digin_cli.tasks.runtime import Progress, RuntimeOptions, check_out, resolve_device, slug

DIRECTIONS_FORMAT = 1


@dataclass
class DirectionsJob:
    classifier: str
    class_name: str
    folder: Path
    out: Path
    components: int = 10  # how many components to write, largest variance first
    top_images: int = 8  # images per component on its sheet, most activating first
    batch_size: int = 32
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)


@dataclass(frozen=True)
class NeuralPCA:
    """A class's components: what `directions.json` and the .npy files hold."""

    class_index: int
    mean: torch.Tensor  # (D,) mean contribution mu
    components: torch.Tensor  # (L, D) unit eigenvectors v_l, largest eigenvalue first
    eigenvalues: torch.Tensor  # (L,)
    explained: torch.Tensor  # (L,) share of the contributions' total variance
    weight: torch.Tensor  # (D,) w_k

    @property
    def scales(self) -> torch.Tensor:
        """(L,) s_l = sum_i v_l,i: what turns a projection into a share of the logit."""
        return self.components.sum(dim=1)

    def directions(self) -> torch.Tensor:
        """(L, D) feature-space directions d_l = s_l * (w_k * v_l)."""
        return self.scales[:, None] * self.weight[None, :] * self.components

    def activations(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) penultimate features -> (N, L) alpha_l, each component's share of the logit."""
        contributions = features.float() * self.weight  # (N, D)
        return ((contributions - self.mean) @ self.components.T) * self.scales  # (N, L)


def neural_pca(features: torch.Tensor, weight: torch.Tensor, class_index: int, count: int) -> NeuralPCA:
    """PCA of the contributions w_k * phi(x) of (N, D) features; the first `count` components."""
    contributions = features.double() * weight.double()  # (N, D)
    mean = contributions.mean(dim=0)  # (D,)
    centred = contributions - mean  # (N, D)
    # The SVD of the centred contributions: right singular vectors are the covariance's
    # eigenvectors, singular values squared / (N - 1) its eigenvalues (no D x D matrix).
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)  # (min(N, D),), (min(N, D), D)
    eigenvalues = singular**2 / max(len(features) - 1, 1)
    total = eigenvalues.sum().clamp_min(1e-30)
    count = min(count, len(features) - 1, len(eigenvalues))  # centring leaves N - 1 directions of variance at most
    return NeuralPCA(
        class_index=class_index,
        mean=mean.float(),
        components=vh[:count].float(),
        eigenvalues=eigenvalues[:count].float(),
        explained=(eigenvalues[:count] / total).float(),
        weight=weight.float(),
    )


@torch.no_grad()
def class_features(classifier: Classifier, files: list[Path], batch_size: int, device) -> tuple[torch.Tensor, list[Path], list[dict]]:
    """Penultimate features (N, D) of the readable files, `batch_size` images in memory at a
    time; the files used; the skipped ones with why."""
    size = max(classifier.input_size)
    used, skipped, features = [], [], []
    for start in range(0, len(files), batch_size):
        images = []
        for path in files[start : start + batch_size]:
            try:
                images.append(load_image(path, size))
                used.append(path)
            except ImageReadError as error:
                skipped.append({"file": path.name, "error": str(error)})
        if images:
            features.append(classifier.features(torch.stack(images).to(device)).float().cpu())  # (B, D)
    return (torch.cat(features) if features else torch.empty(0)), used, skipped


@torch.no_grad()
def run_directions(job: DirectionsJob, progress: Progress | None = None) -> dict[str, Any]:
    # 1. Check the options and the folder before anything heavy is loaded.
    if job.components < 1 or job.top_images < 1 or job.batch_size < 1:
        raise DiginError("--components, --top-images and --batch-size must be at least 1")
    folder = Path(job.folder)
    if not folder.is_dir():
        raise DiginError(f"FOLDER {folder} is not a folder; give a folder of images of the class")
    files = list_images(folder)
    if len(files) < 2:
        raise DiginError(f"FOLDER {folder} holds {len(files)} image(s); PCA needs at least 2 images of the class (50 or more is better)")
    check_out(job.out)
    device = resolve_device(job.runtime.device)

    # 2. The classifier, its last layer and the class.
    classifier = load_classifier(job.classifier, device)
    class_index, class_name, weight = class_head(classifier, job.class_name, "neural PCA")
    weight = weight.cpu()  # (D,)

    # 3. The class's contributions and their principal components.
    features, used, skipped = class_features(classifier, files, job.batch_size, device)  # (N, D)
    if len(used) < 2:
        raise DiginError(f"FOLDER {folder}: only {len(used)} readable image(s); PCA needs at least 2")
    pca = neural_pca(features, weight, class_index, job.components)
    alphas = pca.activations(features)  # (N, L)
    logits = classifier.head(features.to(device)).float().cpu()  # (N, C)

    # 4. Write each direction, its sheet of most activating images, and the record.
    directions = pca.directions()  # (L, D)
    label = slug(class_name)
    entries = []
    size = max(classifier.input_size)
    for l in range(len(directions)):
        direction_file = f"{label}-c{l}.npy"
        save_vector_file(directions[l], job.out / direction_file)
        order = alphas[:, l].argsort(descending=True)[: job.top_images].tolist()
        panels = [(load_image(used[i], size), [used[i].name[:18], f"alpha {alphas[i, l]:+.2f}"]) for i in order]
        sheet_file = f"{label}-c{l}-top.png"
        title = (f"component {l} of '{class_name}' in {classifier.spec}: {100 * float(pca.explained[l]):.1f}% of the "
                 f"variance; its most activating images")  # fmt: skip
        save_png(labelled_sheet(panels, title), job.out / sheet_file)
        entries.append({
            "component": l,
            "eigenvalue": round(float(pca.eigenvalues[l]), 6),
            "explained_variance": round(float(pca.explained[l]), 6),
            "alpha_std": round(float(alphas[:, l].std()), 6),
            "direction_file": direction_file,
            "direction_offset": round(float(pca.scales[l] * (pca.mean @ pca.components[l])), 6),
            "sheet": sheet_file,
            "top_images": [{"file": used[i].name, "alpha": round(float(alphas[i, l]), 6)} for i in order],
        })
    record = {
        "format": DIRECTIONS_FORMAT,
        "method": "neural PCA (Neuhaus et al. 2023): PCA of w_k * phi(x) over the class's images; "
                  "alpha_l(x) = <w_k * phi(x) - mu, v_l> * sum(v_l); direction d_l = sum(v_l) * w_k * v_l, "
                  "<phi(x), d_l> = alpha_l(x) + direction_offset",
        "classifier": classifier.spec,
        "class_name": class_name,
        "class_index": class_index,
        "folder": str(folder),
        "images": len(used),
        "skipped": skipped,
        "feature_width": int(features.shape[1]),
        "mean_logit": round(float(logits[:, class_index].mean()), 6),
        "mean_confidence": round(float(logits.softmax(-1)[:, class_index].mean()), 6),
        "components": entries,
        "activations": {used[i].name: [round(float(a), 6) for a in alphas[i]] for i in range(len(used))},
    }
    write_json(record, job.out / "directions.json")
    return record
