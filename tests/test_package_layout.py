"""The package's layering, checked from its source: layers point one way (nothing below the command line imports
it), no import circle (function-level imports included), no function past about 80 lines (flag declarations
aside), no SA literal in the generic layers, and no heuristic rewriting of messages into flag words."""
import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'timm_sadistill'
LOWER_LAYERS = ('training', 'tasks', 'losses', 'features', 'ops')
# SA's own files, the only ones that may name it as a literal
SA_FILES = {'losses/sa.py', 'tasks/sa_task.py'}
MAX_FUNCTION_LINES = 80


def modules() -> Dict[str, Path]:
    """'timm_sadistill.tasks.distill_task' -> its file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = ('timm_sadistill',) + path.relative_to(PACKAGE).with_suffix('').parts
        found['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
    return found


def imports_of(name: str, path: Path, known: Set[str]) -> Iterator[str]:
    """The package modules ``name`` imports anywhere in its file: ``from .x import y`` gives ``x``'s module, or
    ``x.y`` where ``y`` is a submodule."""
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ''
            for alias in node.names:
                if f'{target}.{alias.name}' in known:
                    yield f'{target}.{alias.name}'
                elif target in known:
                    yield target
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in known)


def graph() -> Dict[str, Set[str]]:
    found = modules()
    return {name: set(imports_of(name, path, set(found))) - {name} for name, path in found.items()}


def test_nothing_below_the_command_line_imports_it():
    wrong = [f'{name} imports {target}' for name, targets in graph().items() for target in targets
             if name.split('.')[1:2] in [[layer] for layer in LOWER_LAYERS] and target.startswith('timm_sadistill.cli')]
    assert not wrong, wrong


def test_no_import_circle():
    edges = graph()
    circles: List[List[str]] = []

    def visit(node: str, path: List[str], on_path: Set[str], done: Set[str]) -> None:
        for target in sorted(edges[node]):
            if target in on_path:
                circles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, path + [target], on_path | {target}, done)
        done.add(node)

    done: Set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start], {start}, done)
    assert not circles, [' -> '.join(c) for c in circles]


def functions() -> Iterator[tuple]:
    for path in sorted(PACKAGE.rglob('*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(PACKAGE).as_posix(), node


def test_no_function_is_longer_than_about_80_lines():
    """Flag declarations (``add_*_arguments``: one statement a flag) are lists, not logic, and are exempt."""
    long = [f'{file}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)'
            for file, node in functions()
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
            and not (node.name.startswith('add_') and node.name.endswith('_arguments'))]
    assert not long, long


def docstrings(tree: ast.AST) -> Set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


@pytest.mark.parametrize('literal', ['sa'])
def test_sa_is_named_only_in_its_own_files(literal):
    named = []
    for path in sorted(PACKAGE.rglob('*.py')):
        file = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text())
        skip = docstrings(tree)
        named += [f'{file}:{node.lineno}' for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value == literal and id(node) not in skip]
    assert not [where for where in named if where.split(':')[0] not in SA_FILES], named


def test_messages_are_not_rewritten_into_flag_words():
    assert not [p for p in PACKAGE.rglob('*.py') if 'in_flag_words' in p.read_text()]


def test_the_readme_layout_map_names_every_module():
    readme = (PACKAGE.parent / 'README.md').read_text()
    layout = readme[readme.index('## Layout'):readme.index('## Documentation')]
    missing = [path.relative_to(PACKAGE).as_posix() for path in sorted(PACKAGE.rglob('*.py'))
               if path.name != '__init__.py' and path.name not in layout]
    assert not missing, f"README.md's layout map does not name {missing}"
