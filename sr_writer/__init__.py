"""Writers for the node's DICOM outputs: SEG, TID 1500 SR and the summary image."""
