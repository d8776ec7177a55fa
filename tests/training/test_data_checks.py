"""The data checks of ``train``: wrong data folders are refused with the path before anything is written, the checks
add no walk of the tree to timm's own listing, and an undecodable image stops the run when it is read."""
import os
import shutil
from pathlib import Path
from typing import List

import numpy as np
import pytest
from PIL import Image

from test_cli import COMMON_FLAGS, STUDENT, check_ok, run_cli
from timm_sadistill.training import data_loading as data_module
from timm_sadistill.errors import UsageError
from timm_sadistill.training.image_decode import UnreadableImageError
from timm_sadistill.cli.train import parse_args

CLASSES = ('class0', 'class1', 'class2')  # COMMON_FLAGS train 3 classes


def write_tiny_folder(root: Path, per_class: int = 3, val_per_class: int = 1) -> Path:
    """train/ and validation/ of 8x8 random PNGs, one folder per class (3 x 3: one batch of COMMON_FLAGS' 8)."""
    rng = np.random.default_rng(0)
    for split, count in (('train', per_class), ('validation', val_per_class)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / name / f'{i}.png')
    return root


def truncate(path: Path) -> None:
    """Keep the signature, the header chunk and half of the pixel data: the file opens but does not decode."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def error_lines(stderr: str) -> List[str]:
    return [line for line in stderr.splitlines() if 'error:' in line]


def _no_validation(data: Path) -> str:
    shutil.rmtree(data / 'validation')
    return f"No validation folder '{data / 'validation'}'"


def _no_train_folder(data: Path) -> str:
    shutil.rmtree(data / 'train')
    return f"No train folder '{data / 'train'}'"


def _validation_lacks_a_class(data: Path) -> str:
    shutil.rmtree(data / 'validation' / 'class1')
    return f"The class folders of '{data / 'validation'}' differ from those of '{data / 'train'}' (missing: class1"


def _class_folder_with_a_subfolder(data: Path) -> str:
    (data / 'train' / 'class2' / 'extra').mkdir()
    (data / 'train' / 'class2' / '1.png').rename(data / 'train' / 'class2' / 'extra' / '1.png')
    return f"'{data / 'train' / 'class2' / 'extra' / '1.png'}' lies in a subfolder of class folder"


def _empty_data_folder(data: Path) -> str:
    shutil.rmtree(data)
    data.mkdir()
    return f"No images found under '{data}'"


def _empty_splits(data: Path) -> str:
    for split in ('train', 'validation'):
        shutil.rmtree(data / split)
        (data / split).mkdir()
    return f"No images found under '{data / 'validation'}'"


def _truncated_png(data: Path) -> str:
    truncate(data / 'train' / 'class1' / '0.png')
    return f"Cannot decode image '{data / 'train' / 'class1' / '0.png'}' (image file is truncated"


def _stray_file_in_a_split_folder(data: Path) -> str:
    (data / 'train' / 'notes.txt').write_text('not an image')
    return f"'{data / 'train' / 'notes.txt'}' lies directly in the split folder"


def _fewer_images_than_a_batch(data: Path) -> str:
    for name in CLASSES:
        (data / 'train' / name / '1.png').unlink()
        (data / 'train' / name / '2.png').unlink()
    return f"The train split of '{data}' has 3 images, fewer than one batch of 8 x 1 process(es)"


def _empty_class_folder(data: Path) -> str:
    (data / 'train' / 'class3').mkdir()
    return f"Class folder '{data / 'train' / 'class3'}' has no images"


BAD_FOLDERS = {f.__name__[1:]: f for f in (
    _no_validation, _no_train_folder, _validation_lacks_a_class, _class_folder_with_a_subfolder, _empty_data_folder,
    _empty_splits, _truncated_png, _stray_file_in_a_split_folder, _empty_class_folder, _fewer_images_than_a_batch,
)}


@pytest.mark.parametrize('problem', list(BAD_FOLDERS))
def test_bad_data_folder_is_refused_with_its_path_before_anything_is_written(problem, tmp_path):
    data = write_tiny_folder(tmp_path / 'data')
    expected = BAD_FOLDERS[problem](data)
    result = run_cli(['train', '--data-dir', str(data), '--model', STUDENT, '--epochs', '1',
                      '--output', str(tmp_path / 'out'), '--experiment', 'run'] + COMMON_FLAGS, tmp_path)
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert len(error_lines(result.stderr)) == 1 and expected in error_lines(result.stderr)[0], result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ['data'], 'a refused run wrote files'


def test_training_without_validation_only_when_asked(tmp_path):
    data = write_tiny_folder(tmp_path / 'data')
    shutil.rmtree(data / 'validation')
    result = run_cli(['train', '--data-dir', str(data), '--model', STUDENT, '--epochs', '1', '--val-split', '',
                      '--output', str(tmp_path / 'out'), '--experiment', 'run'] + COMMON_FLAGS, tmp_path)
    check_ok(result)
    header = (tmp_path / 'out' / 'run' / 'summary.csv').read_text().splitlines()[0]
    assert 'train_loss' in header and 'eval_top1' not in header


@pytest.mark.parametrize('workers', ['0', '2'])
def test_undecodable_image_found_while_reading_stops_with_its_path(workers, tmp_path):
    """Past the sample decoded up front (none here), the data path decodes every image: one line with the path,
    also when the error is raised in a DataLoader worker process."""
    data = write_tiny_folder(tmp_path / 'data')  # 9 images in batches of 3: every one is read
    truncate(data / 'train' / 'class2' / '1.png')
    result = run_cli(['train', '--data-dir', str(data), '--model', STUDENT, '--epochs', '1', '--check-images', '0',
                      '--output', str(tmp_path / 'out')] + COMMON_FLAGS + ['--workers', workers, '-b', '3'], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr and 'Caught' not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(
        f"timm-sadistill train: error: Cannot decode image '{data / 'train' / 'class2' / '1.png'}' (image file is "
        "truncated") and lines[0].endswith('; remove or replace the file.'), result.stderr[-3000:]


def _datasets(data: Path, *flags: str):
    args, _ = parse_args(['--data-dir', str(data), '--model', STUDENT, '-b', '1', *flags])
    args.rank, args.world_size = 0, 1
    return data_module.create_datasets(args, 3)


def test_folder_checks_add_no_walk_to_timms_listing(tmp_path, monkeypatch):
    data = write_tiny_folder(tmp_path / 'data')
    walked = []
    walk = os.walk
    monkeypatch.setattr(os, 'walk', lambda top, *a, **k: walked.append(str(top)) or walk(top, *a, **k))
    _datasets(data, '--check-images', 'all')
    assert sorted(walked) == [str(data / 'train'), str(data / 'validation')]  # timm's reader, once per split


@pytest.mark.parametrize('check_images,expected', [
    ('0', []), ('2', ['0.png', '2.png']), ('all', [f'{i}.png' for i in range(5)]),
])
def test_decoded_up_front_a_spread_sample_per_class_or_every_image(check_images, expected, tmp_path, monkeypatch):
    data = write_tiny_folder(tmp_path / 'data', per_class=5, val_per_class=1)
    decoded = []
    monkeypatch.setattr(data_module, 'check_decodes', lambda dataset, index: decoded.append(
        (os.path.basename(dataset.reader.root), *dataset.filename(index).split(os.sep))))
    _datasets(data, '--check-images', check_images)
    for name in CLASSES:
        assert sorted(f for split, c, f in decoded if (split, c) == ('train', name)) == expected
        assert sorted(f for split, c, f in decoded if (split, c) == ('validation', name)) == expected[:1]


def test_data_path_names_an_undecodable_file_and_keeps_other_errors(tmp_path):
    data = write_tiny_folder(tmp_path / 'data')
    truncate(data / 'train' / 'class0' / '1.png')
    train, _ = _datasets(data, '--check-images', '0')
    train[0]  # a good image reads as before
    with pytest.raises(UnreadableImageError, match=r"Cannot decode image '.*class0/1\.png' \(image file is truncated"):
        train[1]  # timm's dataset would return the next sample

    def broken_transform(image):
        raise RuntimeError('a bug in a transform')
    train.transform = broken_transform
    with pytest.raises(RuntimeError, match='a bug in a transform') as info:
        train[0]
    assert not isinstance(info.value, UnreadableImageError)


def test_hidden_folders_are_skipped_with_one_line_not_made_classes(tmp_path, caplog):
    data = write_tiny_folder(tmp_path / 'data')
    for split in ('train', 'validation'):  # what Jupyter leaves, in the split folder and in a class folder
        for hidden in (data / split / '.ipynb_checkpoints', data / split / 'class1' / '.ipynb_checkpoints'):
            hidden.mkdir()
            Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(hidden / 'copy.png')
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(data / split / 'class0' / '._0.png')
    with caplog.at_level('WARNING'):
        train, val = _datasets(data)
    for dataset, per_class in ((train, 3), (val, 1)):
        assert dataset.reader.class_to_idx == {name: i for i, name in enumerate(CLASSES)}
        assert sorted(target for _, target in dataset.reader.samples) == sorted(list(range(3)) * per_class)
        assert not [path for path, _ in dataset.reader.samples if '/.' in path]
    skipped = [r.message for r in caplog.records if 'hidden' in r.message]
    assert skipped == [f"Skipping what is hidden in '{data / split}' (a name starting with a dot is not data): "
                       ".ipynb_checkpoints, class0/._0.png, class1/.ipynb_checkpoints."
                       for split in ('train', 'validation')], skipped


def _save_png16(path: Path, value: int) -> None:
    Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(path)  # Pillow reads it back as mode I;16


def test_a_16_bit_image_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    data = write_tiny_folder(tmp_path / 'data')
    _save_png16(data / 'train' / 'class0' / '0.png', 32896)  # 128 * 257: mid grey
    assert Image.open(data / 'train' / 'class0' / '0.png').mode == 'I;16'
    train, _ = _datasets(data, '--check-images', 'all')
    train.transform = None
    image, target = train[0]
    assert target == 0 and image.mode == 'RGB' and np.asarray(image).min() == np.asarray(image).max() == 128


def test_an_image_of_32_bit_pixels_is_refused_with_its_path(tmp_path):
    data = write_tiny_folder(tmp_path / 'data')
    path = data / 'train' / 'class2' / '0.png'  # Pillow reads a file by its content: a float TIFF named .png
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(path, format='TIFF')
    with pytest.raises(UnreadableImageError, match=rf"Image '{path}' has 32-bit float pixels \(Pillow mode F\), "
                                                   "which have no one scale"):
        _datasets(data, '--check-images', 'all')


@pytest.mark.parametrize('lines, expected', [
    (['class0', 'class1', 'class0', 'class2'], "line 3 names 'class0' again (first on line 1); name each class once."),
    (['class0', '', 'class1', 'class2'], 'line 2 is blank;'),
    (['class0', 'class2'], "Class folder '{data}/train/class1' is not in --class-map '{map}'; add its name"),
])
def test_a_class_map_with_a_duplicate_a_blank_line_or_a_missing_folder_is_refused(lines, expected, tmp_path):
    data = write_tiny_folder(tmp_path / 'data')
    class_map = tmp_path / 'classes.txt'
    class_map.write_text('\n'.join(lines) + '\n')
    with pytest.raises(UsageError) as info:
        _datasets(data, '--class-map', str(class_map))
    assert expected.format(data=data, map=class_map) in str(info.value)


def test_a_class_map_in_another_order_numbers_the_classes_by_its_lines(tmp_path):
    data = write_tiny_folder(tmp_path / 'data')
    class_map = tmp_path / 'classes.txt'
    class_map.write_text('class2\nclass0\nclass1\n')
    train, _ = _datasets(data, '--class-map', str(class_map))
    assert train.reader.class_to_idx == {'class2': 0, 'class0': 1, 'class1': 2}


def test_a_refused_class_map_leaves_nothing_behind(tmp_path):
    data = write_tiny_folder(tmp_path / 'data')
    (tmp_path / 'classes.txt').write_text('class0\nclass1\nclass2\nclass1\n')
    result = run_cli(['train', '--data-dir', str(data), '--model', STUDENT, '--class-map', str(tmp_path / 'classes.txt'),
                      '--output', str(tmp_path / 'out')] + COMMON_FLAGS, tmp_path)
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert "line 4 names 'class1' again" in error_lines(result.stderr)[0]
    assert not (tmp_path / 'out').exists()
