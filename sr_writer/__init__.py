"""Writers for the node's DICOM outputs: SEG, TID 1500 SR and the summary image.

`write_outputs` builds and writes all of them for one scored series; the
`build_*` functions return single datasets without writing.
"""

from sr_writer.identity import AlgorithmIdentification
from sr_writer.outputs import DerivedObjects, write_outputs
from sr_writer.seg import build_region_seg, build_seg
from sr_writer.sr import build_sr
from sr_writer.summary import build_notice_image, build_summary_image

__all__ = [
    "AlgorithmIdentification",
    "DerivedObjects",
    "build_notice_image",
    "build_region_seg",
    "build_seg",
    "build_sr",
    "build_summary_image",
    "write_outputs",
]
