"""Undecodable images stop the run with their path, whenever they are read.

timm's `ImageDataset` skips a sample it cannot read (a warning, then the next index), so a truncated or corrupt file
quietly changes the data. `check_decodes` fully decodes one sample and raises `UnreadableImageError` naming the file;
`fail_on_unreadable` makes a dataset do the same whenever it reads a sample, so no data set of any size needs a scan
before training for its bad files to be found: each stops the run when it is first read.
"""
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


def check_decodes(dataset: ImageDataset, index: int) -> None:
    """Read and fully decode sample ``index`` (pixels, not only the header: a PNG cut after an intact header opens
    but does not load); `UnreadableImageError` naming the file when it fails."""
    try:
        fileobj = dataset.reader[index][0]
        with fileobj, Image.open(fileobj) as image:
            image.load()
    except OSError as e:  # UnidentifiedImageError, truncated data, unreadable file
        reason = 'not an image format PIL reads' if isinstance(e, UnidentifiedImageError) else str(e)
        raise UnreadableImageError(f"Cannot decode image '{dataset.filename(index, absolute=True)}' ({reason}); "
                                   "remove or replace the file.") from None


class _FailOnUnreadable(ImageDataset):
    """timm's ImageDataset, except that a sample it cannot read raises `UnreadableImageError` instead of being
    replaced by the next one."""

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except RuntimeError:  # timm's "Failed to load N consecutive samples", N = 1 here (see fail_on_unreadable)
            check_decodes(self, index)  # raises when the file is at fault...
            raise  # ...and anything else is not the data's fault: it keeps its traceback


def fail_on_unreadable(dataset: ImageDataset) -> ImageDataset:
    """Make ``dataset`` (in place, also returned) raise `UnreadableImageError` for a sample it cannot read.

    timm's dataset retries the next index up to ``_max_retries`` times (``TIMM_DATASET_MAX_RETRIES``); with one try
    it gives up on the failing sample itself, and the subclass names its file. The class of the existing object is
    swapped (as ``torch.nn.utils.parametrize`` does for modules) rather than the dataset rebuilt, so the reader's
    listing is not walked again and timm's constructor arguments need not be copied.
    """
    dataset._max_retries = 1
    dataset.__class__ = _FailOnUnreadable
    return dataset
