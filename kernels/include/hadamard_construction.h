// Hadamard matrices H_n = H_{2^k} ⊗ H_m, the same matrices as rotations/hadamard.py builds:
// H_{2^k} by Sylvester's construction (applied as a butterfly, never stored) and the core H_m by
//   Paley I:  m = q + 1 for a prime power q ≡ 3 (mod 4)   (12 from q = 11, 28 from q = 27, ...)
//   Paley II: m = 2(q + 1) for a prime power q ≡ 1 (mod 4) (36 from q = 17, 52 from q = 25, ...)
// Paley I is tried first, and the factorization takes the largest power of two (smallest m), exactly
// as `_construction` and `hadamard_factorization` do there. GF(p^k) elements are the polynomials
// whose base-p digits of the index are the coefficients (low degree first), reduced modulo the
// first monic irreducible polynomial in itertools.product order: entry for entry `_core_hadamard`.
// Host code only (plain C++17), shared by the CPU kernel and a future CUDA one.
#pragma once

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace respin::hadamard {

enum class Kind { kSylvester, kPaleyI, kPaleyII };

struct Core {
  Kind kind;
  int64_t q;  // the prime power of a Paley core (1 for Sylvester)
};

// (p, k) with q == p^k and p prime, or nullopt (like `_prime_power`).
inline std::optional<std::pair<int64_t, int>> PrimePower(int64_t q) {
  if (q < 2) return std::nullopt;
  int64_t p = q;
  for (int64_t d = 2; d * d <= q; ++d) {
    if (q % d == 0) {
      p = d;
      break;
    }
  }
  int k = 0;
  while (q % p == 0) {
    q /= p;
    ++k;
  }
  if (q != 1) return std::nullopt;
  return std::make_pair(p, k);
}

// How H_m is built, or nullopt (like `_construction`).
inline std::optional<Core> CoreConstruction(int64_t m) {
  if (m == 1) return Core{Kind::kSylvester, 1};
  if (m < 1 || m % 4) return std::nullopt;
  if ((m - 1) % 4 == 3 && PrimePower(m - 1)) return Core{Kind::kPaleyI, m - 1};
  if ((m / 2 - 1) % 4 == 1 && PrimePower(m / 2 - 1)) return Core{Kind::kPaleyII, m / 2 - 1};
  return std::nullopt;
}

// (2^k, m) with n == 2^k·m and H_m constructible, m smallest; nullopt if none.
inline std::optional<std::pair<int64_t, int64_t>> Factorization(int64_t n) {
  if (n < 1) return std::nullopt;
  for (int64_t pow2 = n & -n; pow2 >= 1; pow2 /= 2) {
    if (CoreConstruction(n / pow2)) return std::make_pair(pow2, n / pow2);
  }
  return std::nullopt;
}

namespace detail {

using Poly = std::vector<int64_t>;  // coefficients low degree first

inline int64_t Mod(int64_t a, int64_t p) { return ((a % p) + p) % p; }

// Remainder of `a` modulo the monic `f` over GF(p), as `_poly_rem` (length deg f).
inline Poly PolyRem(Poly r, const Poly& f, int64_t p) {
  const size_t d = f.size() - 1;
  for (size_t i = r.size(); i-- > d;) {
    const int64_t c = r[i];
    if (c) {
      for (size_t j = 0; j <= d; ++j) r[i - d + j] = Mod(r[i - d + j] - c * f[j], p);
    }
  }
  Poly out(d, 0);
  for (size_t i = 0; i < d && i < r.size(); ++i) out[i] = Mod(r[i], p);
  return out;
}

// Advances `digits` (first digit slowest) like itertools.product(range(p), repeat=len); false at the end.
inline bool NextProduct(std::vector<int64_t>& digits, int64_t p) {
  for (size_t i = digits.size(); i-- > 0;) {
    if (++digits[i] < p) return true;
    digits[i] = 0;
  }
  return false;
}

// First monic degree-k polynomial over GF(p) with no monic factor of degree 1..k/2.
inline Poly IrreduciblePolynomial(int64_t p, int k) {
  std::vector<int64_t> low(k, 0);
  do {
    Poly f(low);
    f.push_back(1);
    bool irreducible = true;
    for (int d = 1; d <= k / 2 && irreducible; ++d) {
      std::vector<int64_t> g_low(d, 0);
      do {
        Poly g(g_low);
        g.push_back(1);
        Poly rem = PolyRem(f, g, p);
        bool zero = true;
        for (int64_t c : rem) zero = zero && c == 0;
        if (zero) {
          irreducible = false;
          break;
        }
      } while (NextProduct(g_low, p));
    }
    if (irreducible) return f;
  } while (NextProduct(low, p));
  return {};  // cannot happen: irreducible polynomials of every degree exist
}

// Q[i, j] = χ(a_i − a_j) over GF(q), row-major [q, q], as `_jacobsthal`.
inline std::vector<int8_t> Jacobsthal(int64_t q) {
  const auto pk = PrimePower(q);
  const int64_t p = pk->first;
  const int k = pk->second;
  const Poly f = IrreduciblePolynomial(p, k);
  std::vector<int64_t> weights(k);
  for (int i = 0; i < k; ++i) weights[i] = i ? weights[i - 1] * p : 1;
  std::vector<int64_t> digits(q * k);
  for (int64_t i = 0; i < q; ++i)
    for (int t = 0; t < k; ++t) digits[i * k + t] = (i / weights[t]) % p;

  std::vector<int8_t> chi(q, -1);
  for (int64_t a = 0; a < q; ++a) {
    Poly square(2 * k - 1, 0);
    for (int i = 0; i < k; ++i)
      for (int j = 0; j < k; ++j) square[i + j] += digits[a * k + i] * digits[a * k + j];
    const Poly rem = PolyRem(square, f, p);
    int64_t index = 0;
    for (int t = 0; t < k; ++t) index += rem[t] * weights[t];
    chi[index] = 1;
  }
  chi[0] = 0;

  std::vector<int8_t> Q(q * q);
  for (int64_t i = 0; i < q; ++i) {
    for (int64_t j = 0; j < q; ++j) {
      int64_t index = 0;
      for (int t = 0; t < k; ++t) index += Mod(digits[i * k + t] - digits[j * k + t], p) * weights[t];
      Q[i * q + j] = chi[index];
    }
  }
  return Q;
}

}  // namespace detail

// H_m as ±1 int8, row-major [m, m]; empty if m has no construction.
inline std::vector<int8_t> CoreMatrix(int64_t m) {
  const auto core = CoreConstruction(m);
  if (!core) return {};
  if (core->kind == Kind::kSylvester) return {1};
  const int64_t q = core->q;
  const std::vector<int8_t> Q = detail::Jacobsthal(q);
  std::vector<int8_t> H(m * m, 0);
  if (core->kind == Kind::kPaleyI) {  // I + [[0, 1ᵀ], [−1, Q]]
    for (int64_t j = 1; j <= q; ++j) {
      H[j] = 1;
      H[j * m] = -1;
    }
    for (int64_t i = 0; i < q; ++i)
      for (int64_t j = 0; j < q; ++j) H[(i + 1) * m + j + 1] = Q[i * q + j];
    for (int64_t i = 0; i < m; ++i) H[i * m + i] += 1;
    return H;
  }
  // Paley II: C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]], C = [[0, 1ᵀ], [1, Q]].
  const int64_t c = q + 1;
  std::vector<int8_t> C(c * c, 0);
  for (int64_t j = 1; j < c; ++j) C[j] = C[j * c] = 1;
  for (int64_t i = 0; i < q; ++i)
    for (int64_t j = 0; j < q; ++j) C[(i + 1) * c + j + 1] = Q[i * q + j];
  static constexpr int8_t A[2][2] = {{1, 1}, {1, -1}};
  static constexpr int8_t B[2][2] = {{1, -1}, {-1, -1}};
  for (int64_t i = 0; i < c; ++i)
    for (int64_t j = 0; j < c; ++j)
      for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b)
          H[(2 * i + a) * m + 2 * j + b] = static_cast<int8_t>(C[i * c + j] * A[a][b] + (i == j ? B[a][b] : 0));
  return H;
}

}  // namespace respin::hadamard
