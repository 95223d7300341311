// Convolutions whose input is a spike tensor (every value 0 or 1), on the CPU, float32.
//
// A dense convolution multiplies every weight by every input value. When the input is
// 0/1, the forward output is a sum of the weights at the active inputs, and the weight
// gradient is a sum of output-gradient rows at the active inputs: both cost in
// proportion to the number of spikes instead of the number of inputs. This file does
// those two products by gather-and-accumulate over lists of the active inputs; the
// input gradient (whose input is the dense output gradient) stays with oneDNN.
//
// Layouts: spikes s [N, H, W, C], output / output gradient [N, OH, OW, Co] (dense,
// channels-last); weights wt and weight gradient gwt [Co, C, KH, KW] with any strides,
// regrouped inside into rows [KH, KW, C, Co] (kept scratch, tiled copies).
// geometry g[19] = N, H, W, C, Co, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw, then the
// weight's (or weight gradient's) strides in elements along Co, C, KH, KW.
// Sums run in a fixed order whatever the thread count: results are deterministic.
// Threads: OpenMP (parallel_for), the thread count the caller passes (PyTorch's).
// Built and loaded by spike_conv.py (ctypes, plain C ABI: no PyTorch headers).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

struct Geometry {
  int64_t N, H, W, C, Co, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw;
  const int64_t* strides;  // of the [Co, C, KH, KW] weight (gradient)
  explicit Geometry(const int64_t* g)
      : N(g[0]), H(g[1]), W(g[2]), C(g[3]), Co(g[4]), OH(g[5]), OW(g[6]), KH(g[7]), KW(g[8]),
        sh(g[9]), sw(g[10]), ph(g[11]), pw(g[12]), dh(g[13]), dw(g[14]), strides(g + 15) {}
};

// f(begin, end) over [0, n) split into at most `threads` contiguous chunks, run by
// OpenMP. Built with -fopenmp, this file links libgomp.so.1, the very library PyTorch's
// CPU wheels load, so the chunks run on PyTorch's own worker threads (a thread pool of
// ours would fight its spinning workers for the cores); without OpenMP, one by one.
template <typename F>
void parallel_for(int64_t n, int threads, const F& f) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  const int64_t size = (n + chunks - 1) / chunks;
#pragma omp parallel for num_threads(chunks) schedule(static, 1) if (chunks > 1)
  for (int64_t t = 0; t < chunks; ++t) {
    const int64_t begin = t * size, end = std::min(n, begin + size);
    if (begin < end) f(begin, end);
  }
}

// 8 floats: GCC/Clang vector extension (AVX2 register with -march on x86, NEON pairs on ARM)
typedef float v8 __attribute__((vector_size(32)));
inline v8 load8(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

// acc[0:8*NV] += row[0:8*NV], NV vectors of 8 (8 x NV output channels, in registers).
template <int NV>
struct Block {
  v8 acc[NV];
  void zero() {
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) acc[k] = v8{};
  }
  void add(const float* row) {
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) acc[k] += load8(row + 8 * k);
  }
  void store(float* out) const {
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) store8(out + 8 * k, acc[k]);
  }
  void add_to(float* out) const {
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) store8(out + 8 * k, load8(out + 8 * k) + acc[k]);
  }
};

// The scalar remainder (Co % 8 channels).
struct Tail {
  float acc[8];
  int width;
  void zero() { std::fill(acc, acc + 8, 0.f); }
  void add(const float* row) { for (int k = 0; k < width; ++k) acc[k] += row[k]; }
  void store(float* out) const { std::copy(acc, acc + width, out); }
  void add_to(float* out) const { for (int k = 0; k < width; ++k) out[k] += acc[k]; }
};

// Calls body(block, co0) for every slice of the output channels: full blocks of 64
// channels, one block of the remaining multiple of 8, then the scalar tail.
template <typename Body>
void for_channel_blocks(int64_t Co, const Body& body) {
  int64_t co0 = 0;
  for (; co0 + 64 <= Co; co0 += 64) { Block<8> b; body(b, co0); }
  switch ((Co - co0) / 8) {
    case 7: { Block<7> b; body(b, co0); break; }
    case 6: { Block<6> b; body(b, co0); break; }
    case 5: { Block<5> b; body(b, co0); break; }
    case 4: { Block<4> b; body(b, co0); break; }
    case 3: { Block<3> b; body(b, co0); break; }
    case 2: { Block<2> b; body(b, co0); break; }
    case 1: { Block<1> b; body(b, co0); break; }
    default: break;
  }
  co0 += (Co - co0) / 8 * 8;
  if (co0 < Co) { Tail t; t.width = static_cast<int>(Co - co0); body(t, co0); }
}

// Scratch memory kept from call to call, grown as needed and never shrunk: a fresh large
// allocation is mapped anew by the C library and costs a page fault per 4 KiB page,
// on some hosts as much as the work itself. One call at a time uses it (Workspace::lock).
template <typename T>
T* scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// The same, as floats aligned to a cache line: 64 floats starting at a multiple of 16 then
// span 4 lines, not 5.
float* aligned_scratch(std::vector<float>& v, size_t n) {
  const auto at = reinterpret_cast<uintptr_t>(scratch(v, n + 16));
  return reinterpret_cast<float*>((at + 63) & ~uintptr_t(63));
}

struct Entry { int32_t out; int16_t y, x; };  // see spike_conv_weight_grad

struct Workspace {
  std::mutex lock;
  std::vector<int64_t> counts, start;
  std::vector<float> rows;
  std::vector<uint16_t> channels;
  std::vector<Entry> entries;
  std::vector<const uint16_t*> begin;
  std::vector<int32_t> count;
};

Workspace& workspace() {
  static Workspace w;
  return w;
}

// Calls f(row, at) for every weight element: row indexes the rows [KH, KW, C, Co], at the
// strided weight [Co, C, KH, KW]. A transpose in tiles of 16 output channels by 16 of
// the weight's (c, kh, kw) taken in its own memory order (kw fastest when contiguous, c
// when channels-last): a tile reads 16 whole cache lines of the weight and writes 16
// whole lines of rows (torch's permute + contiguous of a contiguous 512x512x3x3 weight
// took 24-30 ms on a 2-core AMD EPYC host, this 4-10 ms). Threads split the tiles.
template <typename F>
void for_weight_elements(const Geometry& g, int threads, const F& f) {
  constexpr int64_t B = 16;
  const int64_t* st = g.strides;
  const bool c_inner = st[1] < st[3];
  const int64_t KK = g.KH * g.KW, K = g.C * KK, tiles_j = (K + B - 1) / B;
  std::vector<int64_t> tap(KK);  // weight offset of tap t = kh*KW + kw
  for (int64_t t = 0; t < KK; ++t) tap[t] = t / g.KW * st[2] + t % g.KW * st[3];
  parallel_for(tiles_j * ((g.Co + B - 1) / B), threads, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t j0 = i % tiles_j * B, j1 = std::min(K, j0 + B);
      const int64_t co0 = i / tiles_j * B, co1 = std::min(g.Co, co0 + B);
      int64_t c = c_inner ? j0 % g.C : j0 / KK, t = c_inner ? j0 / g.C : j0 % KK;
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t row = (t * g.C + c) * g.Co, at = c * st[1] + tap[t];
        for (int64_t co = co0; co < co1; ++co) f(row + co, at + co * st[0]);
        if (c_inner ? ++c == g.C : ++t == KK) {  // the next (c, t) in the weight's memory order
          if (c_inner) c = 0, ++t; else t = 0, ++c;
        }
      }
    }
  });
}

// kBits.of[m]: the positions of the set bits of the byte m, ascending (then zeros).
struct BitPositions {
  uint16_t of[256][8];
  constexpr BitPositions() : of() {
    for (int m = 0; m < 256; ++m)
      for (int j = 0, k = 0; j < 8; ++j)
        if (m >> j & 1) of[m][k++] = uint16_t(j);
  }
};
constexpr BitPositions kBits;

// The active channels of one pixel (row[c] != 0, NaN included), ascending, written to
// list (which has room for C); returns their number. Branch-free: with AVX, 8 channels
// at a time (a compare mask, its bit positions from kBits, one 16-byte store); else one
// write per channel, the end advancing on a spike. Writes stay below list + C.
inline int64_t active_channels(const float* row, int64_t C, uint16_t* list) {
  uint16_t* out = list;
  int64_t c = 0;
#if defined(__AVX__)
  for (; c + 8 <= C; c += 8) {
    const unsigned m = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + c), _mm256_setzero_ps(),
                                                                 _CMP_NEQ_UQ)));
    const __m128i at = _mm_add_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kBits.of[m])),
                                     _mm_set1_epi16(int16_t(c)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), at);
    out += __builtin_popcount(m);
  }
#endif
  for (; c < C; ++c) {
    *out = uint16_t(c);
    out += row[c] != 0.f;
  }
  return out - list;
}

// Each pixel's active channels (ascending), built in one pass: threads split the pixels,
// each writing its pixels' lists into its own part of the workspace.
struct ChannelLists {
  const uint16_t* const* begin;  // [P]: pixel p's list
  const int32_t* count;          // [P]: its length

  ChannelLists(const float* s, int64_t P, int64_t C, int threads, Workspace& w) {
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, P));
    const int64_t size = (P + chunks - 1) / chunks;
    uint16_t* buffer = scratch(w.channels, P * C);
    const uint16_t** starts = scratch(w.begin, P);
    int32_t* counts = scratch(w.count, P);
    parallel_for(chunks, threads, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t p0 = t * size, p1 = std::min(P, p0 + size);
        uint16_t* out = buffer + p0 * C;
        for (int64_t p = p0; p < p1; ++p) {  // packed: each list starts where the last ended
          starts[p] = out;
          counts[p] = int32_t(active_channels(s + p * C, C, out));
          out += counts[p];
        }
      }
    });
    begin = starts;
    count = counts;
  }
};

// Counting sort of the active inputs (the P pixels' lists) into buckets, keeping input
// order within a bucket. pixel(p) gives, once per pixel, {base, item}: the active input
// (p, c) goes to bucket base + c * step, and the list stores item(pixel(p), c). start
// gets nbuckets + 1 offsets; threads split the pixels.
// start[b] .. start[b+1] is bucket b's range of items.
template <typename T, typename Pixel, typename Item>
void bucket_sort(const ChannelLists& lists, int64_t P, int64_t nbuckets, int64_t step, int threads,
                    const Pixel& pixel, const Item& item, Workspace& w, std::vector<T>& storage,
                    const int64_t*& start, const T*& items) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, P));
  const int64_t size = (P + chunks - 1) / chunks;
  int64_t* counts = scratch(w.counts, chunks * nbuckets);
  std::fill(counts, counts + chunks * nbuckets, 0);
  parallel_for(chunks, threads, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* count = counts + t * nbuckets;
      for (int64_t p = t * size; p < std::min(P, (t + 1) * size); ++p) {
        int64_t* at = count + pixel(p).base;
        for (int32_t i = 0; i < lists.count[p]; ++i) ++at[lists.begin[p][i] * step];
      }
    }
  });
  int64_t* offsets = scratch(w.start, nbuckets + 1);
  int64_t total = 0;
  for (int64_t b = 0; b < nbuckets; ++b) {
    offsets[b] = total;
    for (int64_t t = 0; t < chunks; ++t) {
      const int64_t n = counts[t * nbuckets + b];
      counts[t * nbuckets + b] = total;  // from here on: where chunk t writes bucket b
      total += n;
    }
  }
  offsets[nbuckets] = total;
  T* out = scratch(storage, total);
  parallel_for(chunks, threads, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* next = counts + t * nbuckets;
      for (int64_t p = t * size; p < std::min(P, (t + 1) * size); ++p) {
        const auto info = pixel(p);
        const uint16_t* channel = lists.begin[p];
        for (int32_t i = 0; i < lists.count[p]; ++i)
          out[next[info.base + channel[i] * step]++] = item(info, channel[i]);
      }
    }
  });
  start = offsets;
  items = out;
}

}  // namespace

extern "C" {

// The number of nonzero values among s[0 .. n).
int64_t spike_count(const float* s, int64_t n, int threads) {
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<int64_t> counts(chunks, 0);
  parallel_for(chunks, threads, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const float* begin = s + c * kChunk;
      const int64_t size = std::min(n - c * kChunk, kChunk);
      int32_t count = 0;
      for (int64_t i = 0; i < size; ++i) count += begin[i] != 0.f;
      counts[c] = count;
    }
  });
  int64_t total = 0;
  for (int64_t count : counts) total += count;
  return total;
}

// out[n, oh, ow, :] = sum over (kh, kw) and active channels c at the input pixel
// (oh*sh - ph + kh*dh, ow*sw - pw + kw*dw) of wt[:, c, kh, kw] (as rows[kh, kw, c, :]).
void spike_conv_forward(const float* s, const float* wt, float* out, const int64_t* geometry,
                           int threads) {
  const Geometry g(geometry);
  Workspace& w = workspace();
  const std::lock_guard<std::mutex> hold(w.lock);
  float* rows = aligned_scratch(w.rows, g.KH * g.KW * g.C * g.Co);
  for_weight_elements(g, threads, [&](int64_t row, int64_t at) { rows[row] = wt[at]; });
  const ChannelLists lists(s, g.N * g.H * g.W, g.C, threads, w);
  parallel_for(g.N * g.OH, threads, [&](int64_t r0, int64_t r1) {
    for_channel_blocks(g.Co, [&](auto& block, int64_t co0) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / g.OH, oh = r % g.OH;
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          block.zero();
          for (int64_t kh = 0; kh < g.KH; ++kh) {
            const int64_t ih = oh * g.sh - g.ph + kh * g.dh;
            if (ih < 0 || ih >= g.H) continue;
            for (int64_t kw = 0; kw < g.KW; ++kw) {
              const int64_t iw = ow * g.sw - g.pw + kw * g.dw;
              if (iw < 0 || iw >= g.W) continue;
              const int64_t p = (n * g.H + ih) * g.W + iw;
              const float* tap = rows + (kh * g.KW + kw) * g.C * g.Co + co0;
              const uint16_t* channel = lists.begin[p];
              for (int32_t j = 0; j < lists.count[p]; ++j) block.add(tap + channel[j] * g.Co);
            }
          }
          block.store(out + (r * g.OW + ow) * g.Co + co0);
        }
      }
    });
  });
}

// gwt[:, c, kh, kw] = sum over active inputs (n, ih, iw, c) of go[n, oh, ow, :] where
// oh = (ih + ph - kh*dh) / sh and ow likewise (exact division, inside the output).
// The active inputs are sorted by (image group, channel, residue of (ih+ph, iw+pw) modulo
// the stride): a (kh, kw) reads only the residue class that lands on the output grid, and
// a group of images' output gradient stays in cache while every channel reads it.
// Threads split the channels; the sums gather in rows[kh, kw, c, :], then go to gwt.
void spike_conv_weight_grad(const float* s, const float* go, float* gwt, const int64_t* geometry,
                               int threads) {
  const Geometry g(geometry);
  const int64_t HW = g.H * g.W, classes = g.sh * g.sw;
  const int64_t group = std::max<int64_t>(1, 256 / std::max<int64_t>(1, g.OH * g.OW));  // images per group
  const int64_t groups = (g.N + group - 1) / group;
  // an active input (n, ih, iw) as y = (ih+ph)/sh, x = (iw+pw)/sw and out, the index of
  // output pixel (n, y, x): for (kh, kw) it feeds output (y - dy, x - dx), index out - dy*OW - dx
  struct Pixel { int64_t base; Entry entry; };
  auto pixel = [&](int64_t p) {
    const int64_t n = p / HW, ih = p / g.W % g.H, iw = p % g.W;
    const int64_t cls = (ih + g.ph) % g.sh * g.sw + (iw + g.pw) % g.sw;
    const int64_t y = (ih + g.ph) / g.sh, x = (iw + g.pw) / g.sw;
    return Pixel{n / group * g.C * classes + cls,
                 Entry{int32_t((n * g.OH + y) * g.OW + x), int16_t(y), int16_t(x)}};
  };
  Workspace& w = workspace();
  const std::lock_guard<std::mutex> hold(w.lock);
  const int64_t* start = nullptr;
  const Entry* entries = nullptr;
  const ChannelLists lists(s, g.N * HW, g.C, threads, w);
  bucket_sort<Entry>(lists, g.N * HW, groups * g.C * classes, classes, threads, pixel,
                     [](const Pixel& px, int64_t) { return px.entry; }, w, w.entries, start, entries);
  float* rows = aligned_scratch(w.rows, g.KH * g.KW * g.C * g.Co);
  std::fill(rows, rows + g.KH * g.KW * g.C * g.Co, 0.f);
  parallel_for(g.C, threads, [&](int64_t c0, int64_t c1) {
    for (int64_t grp = 0; grp < groups; ++grp)
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t kh = 0; kh < g.KH; ++kh)
          for (int64_t kw = 0; kw < g.KW; ++kw) {
            const int64_t cls = (kh * g.dh) % g.sh * g.sw + (kw * g.dw) % g.sw;
            const int64_t b = (grp * g.C + c) * classes + cls;
            const int64_t dy = kh * g.dh / g.sh, dx = kw * g.dw / g.sw;
            float* row = rows + ((kh * g.KW + kw) * g.C + c) * g.Co;
            for_channel_blocks(g.Co, [&](auto& block, int64_t co0) {
              block.zero();
              for (int64_t j = start[b]; j < start[b + 1]; ++j) {
                const Entry& e = entries[j];
                const int64_t y = e.y - dy, x = e.x - dx;
                if (y < 0 || y >= g.OH || x < 0 || x >= g.OW) continue;
                block.add(go + (e.out - dy * g.OW - dx) * g.Co + co0);
              }
              block.add_to(row + co0);  // groups in order: a deterministic sum
            });
          }
  });
  for_weight_elements(g, threads, [&](int64_t row, int64_t at) { gwt[at] = rows[row]; });
}

}  // extern "C"
