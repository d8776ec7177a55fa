"""Undecodable images stop the run with their path, whenever they are read; 16-bit images are scaled to 8 bits.

timm's `ImageDataset` skips a sample it cannot read (a warning, then the next index), so a truncated or corrupt file
quietly changes the data. `check_decodes` fully decodes one sample and raises `UnreadableImageError` naming the file;
`fail_on_unreadable` makes a dataset do the same whenever it reads a sample, so no data set of any size needs a scan
before training for its bad files to be found: each stops the run when it is first read.
"""
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError
from timm.data import ImageDataset

from ..errors import UsageError

__all__ = ['UnreadableImageError', 'check_decodes', 'fail_on_unreadable']


class UnreadableImageError(UsageError):
    """An image file that does not decode; the message names the file and the fix.

    torch's DataLoader re-raises an exception of a worker process in the main process as ``type(e)(text)``, with
    ``text`` = 'Caught ... in DataLoader worker process N.\\nOriginal Traceback ...' ending in the line
    '<module>.UnreadableImageError: <message>'. Built from such a text, this error keeps only its own one-line message,
    so the user reads the same line with ``-j 0`` and ``-j N``.
    """

    def __init__(self, message: str):
        if message.startswith('Caught ') and '\nOriginal Traceback' in message:
            message = message.rstrip().rsplit('\n', 1)[-1].split(': ', 1)[-1]
        super().__init__(message)


# Pillow's modes of one channel of 16 bits, with their largest value: convert() to 'L' or 'RGB' clips them at 255,
# so a 16-bit grayscale PNG would train as white
_SIXTEEN_BIT = {'I;16': 65535, 'I;16L': 65535, 'I;16B': 65535, 'I;16N': 65535}
# modes whose pixels have no one scale to 8 bits: 32-bit integers and floats (TIFF)
_NO_SCALE = {'I': '32-bit integer', 'F': '32-bit float'}


def _load(fileobj, path: str, mode: Optional[str]) -> Image.Image:
    """The fully decoded image of ``fileobj`` in ``mode`` ('RGB', 'L'; None keeps its own), a 16-bit image scaled
    to 8 bits; `UnreadableImageError` naming ``path`` for a file that does not decode or whose pixels have no
    8-bit scale."""
    try:
        with fileobj, Image.open(fileobj) as image:
            image.load()
            if image.mode in _NO_SCALE:
                raise UnreadableImageError(
                    f"Image '{path}' has {_NO_SCALE[image.mode]} pixels (Pillow mode {image.mode}), which have no one "
                    "scale to the 8 bits a model is fed; save it as an 8- or 16-bit PNG or a JPEG.")
            if image.mode in _SIXTEEN_BIT:
                scaled = np.asarray(image).astype(np.float32) * (255.0 / _SIXTEEN_BIT[image.mode])
                image = Image.fromarray(np.rint(scaled).astype(np.uint8), 'L')
            return image.convert(mode) if mode else image.copy()
    except OSError as e:  # UnidentifiedImageError, truncated data, unreadable or vanished file
        reason = 'not an image format PIL reads' if isinstance(e, UnidentifiedImageError) else str(e)
        raise UnreadableImageError(f"Cannot decode image '{path}' ({reason}); remove or replace the file.") from None


def check_decodes(dataset: ImageDataset, index: int) -> None:
    """Read and fully decode sample ``index`` (pixels, not only the header: a PNG cut after an intact header opens
    but does not load); `UnreadableImageError` naming the file when it fails."""
    path = dataset.filename(index, absolute=True)
    try:
        fileobj = dataset.reader[index][0]
    except OSError as e:
        raise UnreadableImageError(f"Cannot decode image '{path}' ({e}); remove or replace the file.") from None
    _load(fileobj, path, None)


class _FailOnUnreadable(ImageDataset):
    """timm's ImageDataset, except that a sample it cannot read raises `UnreadableImageError` instead of being
    replaced by the next one, and a 16-bit image is scaled to 8 bits instead of clipped."""

    def __getitem__(self, index: int):
        path = self.filename(index, absolute=True)
        try:
            fileobj, target, *features = self.reader[index]
        except OSError as e:
            raise UnreadableImageError(f"Cannot decode image '{path}' ({e}); remove or replace the file.") from None
        image = _load(fileobj, path, self.input_img_mode)
        if self.transform is not None:
            image = self.transform(image)
        if target is None:
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        return (image, target) if self.additional_features is None else (image, target, *features)


def fail_on_unreadable(dataset: ImageDataset) -> ImageDataset:
    """Make ``dataset`` (in place, also returned) raise `UnreadableImageError` for a sample it cannot read, and scale
    a 16-bit image to 8 bits.

    timm's dataset skips a sample it cannot read (the next index, up to ``_max_retries`` times) and clips a 16-bit
    image at 255; the subclass names the file instead. The class of the existing object is swapped (as
    ``torch.nn.utils.parametrize`` does for modules) rather than the dataset rebuilt, so the reader's listing is not
    walked again and timm's constructor arguments need not be copied.
    """
    dataset.__class__ = _FailOnUnreadable
    return dataset
