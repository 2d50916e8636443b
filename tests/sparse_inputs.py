"""Random sparse inputs shared by the sparse op's tests (tests/ops/test_sparse_op.py) and the
fits on sparse X (tests/integration/test_sparse_fit.py): a fresh seeded generator, random CSR
matrices with empty rows and duplicate columns, their float64 dense matrix."""

import numpy as np
import scipy.sparse as sp
import torch


def _rng():
    seed = np.random.SeedSequence().entropy  # fresh data every run
    print(f"data seed: {seed}")
    return np.random.default_rng(seed)


def _random_csr(rng, N, D, density=0.3, dtype=np.float64, index=np.int64, duplicates=False,
                empty_rows=0.0):
    """A CSR matrix in raw arrays: rows with random (unsorted; with `duplicates`, repeated)
    columns; a fraction of empty rows; columns beyond the drawn ones stay empty."""
    indptr, indices, data = [0], [], []
    for _ in range(N):
        k = 0 if rng.random() < empty_rows else rng.binomial(max(D, 1), density) if D else 0
        if duplicates and k:
            cols = rng.integers(0, D, size=k + rng.integers(0, 3))
        else:
            cols = rng.permutation(D)[:k]
        indices.extend(cols.tolist())
        data.extend(rng.normal(size=len(cols)).tolist())
        indptr.append(len(indices))
    A = sp.csr_matrix((np.asarray(data, dtype=dtype), np.asarray(indices, dtype=index),
                       np.asarray(indptr, dtype=index)), shape=(N, D))
    # scipy narrows int64 indices that fit in int32: set the index arrays of the dtype asked for
    A.indices, A.indptr = A.indices.astype(index), A.indptr.astype(index)
    return A


def _dense(A):
    """The float64 dense matrix of A, duplicates summed (scipy's meaning)."""
    return torch.from_numpy(A.toarray().astype(np.float64))
