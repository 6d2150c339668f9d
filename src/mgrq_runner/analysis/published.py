"""Published ImageNet top-1 (%) of the methods this runner compares with, as rows beside measured tables.

Source: the papers, as listed with their tables in ``docs/method.md`` (section 8; section 7 for the FP32 references
of the pinned timm weights).
"""

from __future__ import annotations

# From docs/method.md section 8: the W4A4 table, the Swin-T RepQ-ViT W4A4 number given under it, the W3A3 FIMA-Q and
# LS-ViT lines, GLF-Q's mean of 3 seeds at W3A3 and W4A4; and section 7: the FP32 references.
# Keyed by setting; the "FP" entry is shown in every table that has ImageNet model columns.
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "FP": {
        "FP32 (published)": {
            "vit_s": 81.39,
            "vit_b": 84.54,
            "deit_t": 72.21,
            "deit_s": 79.85,
            "deit_b": 81.80,
            "swin_t": 81.35,
            "swin_s": 83.23,
            "swin_b": 85.27,
        },
    },
    "W4A4": {
        "RepQ-ViT (published)": {
            "vit_s": 65.05,
            "vit_b": 68.48,
            "deit_t": 57.43,
            "deit_s": 69.03,
            "deit_b": 75.61,
            "swin_t": 72.31,
            "swin_s": 79.45,
            "swin_b": 78.32,
        },
        "QDrop, APHQ-ViT re-run (published)": {
            "vit_s": 67.62,
            "vit_b": 82.02,
            "deit_t": 64.95,
            "deit_s": 74.73,
            "deit_b": 79.64,
            "swin_s": 81.03,
            "swin_b": 82.79,
        },
        "APHQ-ViT (published)": {
            "vit_s": 76.07,
            "vit_b": 82.41,
            "deit_t": 66.66,
            "deit_s": 76.40,
            "deit_b": 80.21,
            "swin_s": 81.81,
            "swin_b": 83.42,
        },
        "FIMA-Q (published)": {
            "vit_s": 76.68,
            "vit_b": 83.04,
            "deit_t": 66.84,
            "deit_s": 76.87,
            "deit_b": 80.33,
            "swin_s": 81.82,
            "swin_b": 83.60,
        },
        "GLF-Q (published)": {
            "vit_s": 77.82,
            "vit_b": 83.22,
            "deit_t": 67.37,
            "deit_s": 77.34,
            "deit_b": 80.53,
            "swin_s": 82.01,
            "swin_b": 83.80,
        },
    },
    "W3A3": {
        "FIMA-Q (published)": {
            "vit_s": 64.09,
            "vit_b": 77.63,
            "deit_t": 55.55,
            "deit_s": 69.13,
            "deit_b": 76.54,
            "swin_s": 77.26,
            "swin_b": 78.82,
        },
        "LS-ViT (published)": {
            "vit_s": 64.10,
            "vit_b": 77.65,
            "deit_t": 55.72,
            "deit_s": 69.41,
            "deit_b": 76.57,
            "swin_s": 77.39,
            "swin_b": 79.40,
        },
        "GLF-Q (published)": {
            "vit_s": 67.40,
            "vit_b": 78.18,
            "deit_t": 56.48,
            "deit_s": 71.55,
            "deit_b": 77.20,
            "swin_s": 78.10,
            "swin_b": 80.45,
        },
    },
}
