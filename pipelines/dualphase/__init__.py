"""Dual-phase (arterial + portal-venous) tumour studies: registration and features of both phases."""
