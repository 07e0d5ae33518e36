"""The DICOM node: networking, storage, jobs, scheduler and command line."""
