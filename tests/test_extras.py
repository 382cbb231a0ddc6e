"""manualgrad._extras: a missing optional package is one line naming it and the extra that brings it."""
import sys

import pytest

from manualgrad import _extras


@pytest.fixture
def fake_extra(monkeypatch, tmp_path):
    """Two made-up optional packages: ``mg_absent`` (not installed) and ``mg_broken`` (installed,
    but its own import of a dependency fails), both listed in EXTRAS under the extra ``fake``."""
    (tmp_path / "mg_broken").mkdir()
    (tmp_path / "mg_broken" / "__init__.py").write_text("import mg_dependency_nobody_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for top in ("mg_absent", "mg_broken"):
        monkeypatch.setitem(_extras.EXTRAS, top, (top.replace("_", "-"), "fake"))
        monkeypatch.delitem(sys.modules, top, raising=False)


def test_a_missing_package_raises_one_line_naming_it_and_its_extra(fake_extra):
    assert not _extras.installed("mg_absent")
    with pytest.raises(_extras.MissingExtra) as e:
        _extras.require("mg_absent.sub", "drawing a thing")
    assert str(e.value) == "drawing a thing needs mg-absent: pip install 'manualgrad[fake]'"
    assert isinstance(e.value, ModuleNotFoundError) and e.value.name == "mg_absent"


def test_an_installed_package_that_fails_inside_keeps_its_own_error(fake_extra):
    assert _extras.installed("mg_broken")
    with pytest.raises(ModuleNotFoundError) as e:
        _extras.require("mg_broken", "drawing a thing")
    assert not isinstance(e.value, _extras.MissingExtra) and e.value.name == "mg_dependency_nobody_installed"


def test_an_installed_package_is_returned():
    assert _extras.require("sklearn.datasets", "the digits data set") is sys.modules["sklearn.datasets"]
