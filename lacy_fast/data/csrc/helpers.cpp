// Native hot loops of the CPU data path, called through ctypes (lacy_fast/data/native.py).
//
// Each function has a numpy twin (labeling.project_numpy, packing.build_sample_index_numpy)
// that gives bit-identical results; tests compare the two on random and edge-case inputs.
// Both loops here are single linear merges where numpy needs a binary search per element
// plus gathers: O(n + m) instead of O(n log m), no temporaries. Arguments are validated on
// the Python side; these functions trust their inputs.
#include <cstdint>

extern "C" {

// Bumped when a signature changes, so a stale library is never called with new arguments.
int32_t lacy_abi_version() { return 1; }

// Word-to-subword label projection (see labeling.project).
//   word_start, word_end: (n_words,) fact-word character spans, sorted, non-overlapping
//   tok_start, tok_end:   (n_tokens,) subword character spans, starts non-decreasing
//   first_only:           keep only the first token assigned to each word
//   out:                  (n_tokens,) index of the word labeling each token, -1 for none
void lacy_project(const int64_t* word_start, const int64_t* word_end, int64_t n_words,
                  const int64_t* tok_start, const int64_t* tok_end, int64_t n_tokens,
                  int32_t first_only, int64_t* out) {
    int64_t j = 0;      // first word that ends after the current token's start
    int64_t last = -1;  // highest word assigned so far (for first_only)
    for (int64_t k = 0; k < n_tokens; ++k) {
        const int64_t ts = tok_start[k], te = tok_end[k];
        while (j < n_words && word_end[j] <= ts) ++j;
        int64_t idx = (j < n_words && te > ts && word_start[j] < te) ? j : -1;
        if (first_only) {
            if (idx <= last) idx = -1;
            else last = idx;
        }
        out[k] = idx;
    }
}

// Packed-sample index over a document order (Megatron-LM's build_sample_idx).
//   doc_lengths: (n_docs,) tokens per document, EOS included
//   order:       (n_order,) document ids in reading order (values in [0, n_docs))
//   seq_len:     tokens per sample step; samples hold seq_len + 1 tokens, overlapping by one
//   out:         (n_rows, 2) row i = (position in order, offset in that document) of stream
//                token i * seq_len; n_rows = (total - 1) / seq_len + 1
void lacy_sample_index(const int64_t* doc_lengths, const int64_t* order, int64_t n_order,
                       int64_t seq_len, int64_t n_rows, int64_t* out) {
    int64_t k = 0;          // position in order of the current document
    int64_t doc_start = 0;  // stream position of its first token
    for (int64_t i = 0; i < n_rows; ++i) {
        const int64_t target = i * seq_len;
        while (k < n_order && doc_start + doc_lengths[order[k]] <= target) {
            doc_start += doc_lengths[order[k]];
            ++k;
        }
        out[2 * i] = k;
        out[2 * i + 1] = target - doc_start;
    }
}

}  // extern "C"
