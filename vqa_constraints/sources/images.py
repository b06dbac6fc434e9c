"""Find and open user-supplied images under an images root.

Sources reference images by a relative path that may lack its extension
(the paper's CSVs say "./A photo of Space Needle"); we try the path as given,
then with common image extensions appended. Paths may not leave the root.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class ImageProblem(ValueError):
    """An image that is missing, outside the root, or unreadable (message says which)."""


def find_image(root: Path, reference: str) -> Path:
    """The file ``reference`` names under ``root``; raise ImageProblem if there is none."""
    relative = reference.strip().replace("\\", "/")
    if not relative:
        raise ImageProblem("image path is empty")
    root = root.resolve()
    base = (root / relative).resolve()
    if base != root and root not in base.parents:
        raise ImageProblem(f"image path {reference!r} leaves the images root {root}")
    candidates = [base]
    # "Audible.com" has a suffix that is not an image extension: still append extensions.
    candidates += [base.with_name(base.name + ext) for ext in IMAGE_EXTENSIONS]
    candidates += [base.with_name(base.name + ext.upper()) for ext in IMAGE_EXTENSIONS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = "" if base.suffix.lower() in IMAGE_EXTENSIONS else f" (also tried {', '.join(IMAGE_EXTENSIONS)})"
    raise ImageProblem(f"image {reference!r} not found under {root}{tried}")


def open_image(path: Path) -> Image.Image:
    """Decode fully and convert to RGB, so a truncated file fails here and not in a model."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageProblem(f"image {path} cannot be read: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def load_image(root: Path, reference: str) -> Image.Image:
    return open_image(find_image(root, reference))
