"""The reference environment itself: the versions that produced the published numbers' stack."""
import mmcv
import mmdet
import mmseg


def test_reference_versions():
    assert (mmcv.__version__, mmdet.__version__, mmseg.__version__) == ("1.7.2", "2.28.2", "0.30.0")
