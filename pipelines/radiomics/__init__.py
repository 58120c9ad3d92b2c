"""Tumour radiomics: intratumoral and peritumoral-ring pyradiomics features from a received ROI."""
