// L-BFGS (csrc/fit/lbfgs.h): a line-by-line port of manual_layers/_lbfgs.py, whose comments give
// the references (Byrd, Nocedal and Schnabel 1994 for the compact form; Moré and Thuente 1994
// for the line search) and the reasons for each choice. The history is small (m pairs), so its
// products are plain loops here.
#include "lbfgs.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>

#include "vec.h"

namespace manual_layers {
namespace fit {
namespace {

constexpr double kEps = std::numeric_limits<double>::epsilon();
constexpr double kInf = std::numeric_limits<double>::infinity();

// The Moré-Thuente line search (manual_layers/_lbfgs.py LineSearch).
struct LineSearch {
  double ftol = 1e-3, gtol = 0.9, xtol = 0.1, stpmin = 0.0, stpmax = 1e10;
  double t = 0;
  bool done = false, warning = false, brackt = false;
  int stage = 1;
  double finit = 0, ginit = 0, gtest = 0, width = 0, width1 = 0;
  double stx = 0, fx = 0, gx = 0, sty = 0, fy = 0, gy = 0, stmin = 0, stmax = 0;

  double start(double t0, double phi0, double dphi0) {
    t = std::min(std::max(t0, stpmin), stpmax);
    done = warning = brackt = false;
    stage = 1;
    finit = phi0, ginit = dphi0, gtest = ftol * dphi0;
    width = stpmax - stpmin;
    width1 = 2 * width;
    stx = 0.0, fx = phi0, gx = dphi0;
    sty = 0.0, fy = phi0, gy = dphi0;
    stmin = 0.0, stmax = t * 5.0;
    return t;
  }

  double step(double f, double g);
};

// (theta, gamma) of the cubic through (s0, f0, d0) and (s1, f1, d1); gamma's sign the case's.
void cubic_terms(double s0, double f0, double d0, double s1, double f1, double d1,
                 bool sign_rule, double& theta, double& gamma) {
  theta = 3.0 * (f0 - f1) / (s1 - s0) + d0 + d1;
  const double s = std::max({std::fabs(theta), std::fabs(d0), std::fabs(d1)});
  const double disc = (theta / s) * (theta / s) - (d0 / s) * (d1 / s);
  gamma = s * std::sqrt(std::max(0.0, disc));
  if (!sign_rule) gamma = -gamma;
}

// One safeguarded step of Moré-Thuente (_lbfgs.py _dcstep): updates the interval (stx, sty),
// ls.brackt, and returns the new trial step.
double dcstep(double& stx, double& fx, double& dx, double& sty, double& fy, double& dy,
              double stp, double fp, double dp, LineSearch& ls) {
  const double sgnd = dp * std::copysign(1.0, dx);
  const double stpmin = ls.stmin, stpmax = ls.stmax;
  double stpf, theta, gamma;
  if (fp > fx) {  // case 1: a higher value; bracketed
    cubic_terms(stx, fx, dx, stp, fp, dp, stp >= stx, theta, gamma);
    const double p = (gamma - dx) + theta;
    const double q = ((gamma - dx) + gamma) + dp;
    const double stpc = stx + (p / q) * (stp - stx);
    const double stpq = stx + ((dx / ((fx - fp) / (stp - stx) + dx)) / 2.0) * (stp - stx);
    stpf = std::fabs(stpc - stx) < std::fabs(stpq - stx) ? stpc : stpc + (stpq - stpc) / 2.0;
    ls.brackt = true;
  } else if (sgnd < 0) {  // case 2: derivatives of opposite sign; bracketed
    cubic_terms(stx, fx, dx, stp, fp, dp, stp <= stx, theta, gamma);
    const double p = (gamma - dp) + theta;
    const double q = ((gamma - dp) + gamma) + dx;
    const double stpc = stp + (p / q) * (stx - stp);
    const double stpq = stp + (dp / (dp - dx)) * (stx - stp);
    stpf = std::fabs(stpc - stp) > std::fabs(stpq - stp) ? stpc : stpq;
    ls.brackt = true;
  } else if (std::fabs(dp) < std::fabs(dx)) {  // case 3: the derivative's magnitude decreases
    cubic_terms(stx, fx, dx, stp, fp, dp, stp <= stx, theta, gamma);
    const double p = (gamma - dp) + theta;
    const double q = (gamma + (dx - dp)) + gamma;
    const double r = p / q;
    double stpc;
    if (r < 0 && gamma != 0) stpc = stp + r * (stx - stp);
    else if (stp > stx) stpc = stpmax;
    else stpc = stpmin;
    const double stpq = stp + (dp / (dp - dx)) * (stx - stp);
    if (ls.brackt) {
      stpf = std::fabs(stpc - stp) < std::fabs(stpq - stp) ? stpc : stpq;
      if (stp > stx) stpf = std::min(stp + 0.66 * (sty - stp), stpf);
      else stpf = std::max(stp + 0.66 * (sty - stp), stpf);
    } else {
      stpf = std::fabs(stpc - stp) > std::fabs(stpq - stp) ? stpc : stpq;
      stpf = std::min(std::max(stpf, stpmin), stpmax);
    }
  } else {  // case 4: the derivative does not decrease in magnitude
    if (ls.brackt) {
      cubic_terms(sty, fy, dy, stp, fp, dp, stp <= sty, theta, gamma);
      const double p = (gamma - dp) + theta;
      const double q = ((gamma - dp) + gamma) + dy;
      stpf = stp + (p / q) * (sty - stp);
    } else if (stp > stx) {
      stpf = stpmax;
    } else {
      stpf = stpmin;
    }
  }
  if (fp > fx) {
    sty = stp, fy = fp, dy = dp;
  } else {
    if (sgnd < 0) sty = stx, fy = fx, dy = dx;
    stx = stp, fx = fp, dx = dp;
  }
  return stpf;
}

double LineSearch::step(double f, double g) {
  double tt = t;
  if (!(std::isfinite(f) && std::isfinite(g))) {
    // an overflow at this step: the minimum lies before it; bisect towards the best step
    brackt = true;
    sty = tt, fy = kInf, gy = kInf;
    t = stx + 0.5 * (tt - stx);
    if (t <= stpmin || t == tt) done = warning = true, t = stx;
    return t;
  }
  const double ftest = finit + tt * gtest;
  if (stage == 1 && f <= ftest && g >= 0) stage = 2;
  bool warn = false;
  if (brackt && (tt <= stmin || tt >= stmax)) warn = true;
  if (brackt && stmax - stmin <= xtol * stmax) warn = true;
  if (tt == stpmax && f <= ftest && g <= gtest) warn = true;
  if (tt == stpmin && (f > ftest || g >= gtest)) warn = true;
  if (f <= ftest && std::fabs(g) <= gtol * -ginit) {
    done = true;
    return tt;
  }
  if (warn) {
    done = warning = true;
    return tt;
  }
  if (stage == 1 && f <= fx && f > ftest) {
    // the modified function psi(t) = phi(t) - phi(0) - ftol t phi'(0)
    const double gt = gtest;
    double sx = stx, fxm = fx - stx * gt, gxm = gx - gt;
    double sy = sty, fym = fy - sty * gt, gym = gy - gt;
    tt = dcstep(sx, fxm, gxm, sy, fym, gym, tt, f - tt * gt, g - gt, *this);
    stx = sx, fx = fxm + sx * gt, gx = gxm + gt;
    sty = sy, fy = fym + sy * gt, gy = gym + gt;
  } else {
    tt = dcstep(stx, fx, gx, sty, fy, gy, tt, f, g, *this);
  }
  if (brackt) {
    if (std::fabs(sty - stx) >= 0.66 * width1) tt = stx + 0.5 * (sty - stx);
    width1 = width;
    width = std::fabs(sty - stx);
    stmin = std::min(stx, sty), stmax = std::max(stx, sty);
  } else {
    stmin = tt + 1.1 * (tt - stx);
    stmax = tt + 4.0 * (tt - stx);
  }
  tt = std::min(std::max(tt, stpmin), stpmax);
  if ((brackt && (tt <= stmin || tt >= stmax)) || (brackt && stmax - stmin <= xtol * stmax)) {
    tt = stx;
  }
  t = tt;
  return tt;
}

// The last m pairs (_lbfgs.py _History): SY row 2i = s, 2i + 1 = y of slot i (a ring); R and YY
// in age order (oldest first), row-major m x m: R[i][j] = s_i.y_j (i <= j), YY[i][j] = y_i.y_j.
struct History {
  int64_t m, P;
  std::vector<double> SY, R, YY, prods, w;
  std::deque<int64_t> slots;  // slot of each pair, oldest first

  History(int64_t P_, int64_t m_)
      : m(m_), P(P_), SY(2 * m_ * P_), R(m_ * m_, 0.0), YY(m_ * m_, 0.0), prods(2 * m_, 0.0),
        w(2 * m_, 0.0) {}

  double& r(int64_t i, int64_t j) { return R[i * m + j]; }
  double& yy(int64_t i, int64_t j) { return YY[i * m + j]; }
  const double* row(int64_t k) const { return SY.data() + k * P; }
  double* row(int64_t k) { return SY.data() + k * P; }

  // out = -H g, given prods = [S Y]' g (by row of SY)
  void direction(const std::vector<double>& g, std::vector<double>& out) {
    const int64_t k = static_cast<int64_t>(slots.size());
    if (k == 0) {
      for (int64_t j = 0; j < P; ++j) out[j] = -g[j];
      return;
    }
    const double gamma = r(k - 1, k - 1) / yy(k - 1, k - 1);
    std::vector<double> sg(k), yg(k), t(k), v(k), u1(k);
    for (int64_t i = 0; i < k; ++i) sg[i] = prods[2 * slots[i]], yg[i] = prods[2 * slots[i] + 1];
    for (int64_t i = k - 1; i >= 0; --i) {  // R t = S'g (back substitution)
      double s = sg[i];
      for (int64_t j = i + 1; j < k; ++j) s -= r(i, j) * t[j];
      t[i] = s / r(i, i);
    }
    for (int64_t i = 0; i < k; ++i) {  // v = D t + gamma (Y'Y t - Y'g)
      double s = 0;
      for (int64_t j = 0; j < k; ++j) s += yy(i, j) * t[j];
      v[i] = r(i, i) * t[i] + gamma * (s - yg[i]);
    }
    for (int64_t i = 0; i < k; ++i) {  // R' u1 = v (forward substitution)
      double s = v[i];
      for (int64_t j = 0; j < i; ++j) s -= r(j, i) * u1[j];
      u1[i] = s / r(i, i);
    }
    for (int64_t i = 0; i < k; ++i) w[2 * slots[i]] = -u1[i], w[2 * slots[i] + 1] = gamma * t[i];
    const int64_t rows = 2 * k;  // the ring fills slots 0, 1, ... in order
    for (int64_t j = 0; j < P; ++j) out[j] = 0.0;
    for (int64_t q = 0; q < rows; ++q) {
      const double wq = w[q];
      const double* sy = row(q);
      for (int64_t j = 0; j < P; ++j) out[j] += wq * sy[j];
    }
    for (int64_t j = 0; j < P; ++j) out[j] -= g[j] * gamma;
  }

  void push(const std::vector<double>& d, double t, const std::vector<double>& g_new,
            const std::vector<double>& g, double sy) {
    int64_t k = static_cast<int64_t>(slots.size());
    int64_t slot;
    if (k < m) {
      slot = k;
    } else {  // drop the oldest pair: its row and column leave the small matrices
      slot = slots.front();
      slots.pop_front();
      k -= 1;
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j) r(i, j) = r(i + 1, j + 1), yy(i, j) = yy(i + 1, j + 1);
    }
    double* s_row = row(2 * slot);
    double* y_row = row(2 * slot + 1);
    for (int64_t j = 0; j < P; ++j) s_row[j] = d[j] * t, y_row[j] = g_new[j] - g[j];
    r(k, k) = sy;
    yy(k, k) = dot(y_row, y_row, P);
    slots.push_back(slot);
  }

  // prods = [S Y]' g_new; the new pair's column of R and row of Y'Y from the previous prods
  void update_products(const std::vector<double>& g_new, bool pushed) {
    const int64_t n = static_cast<int64_t>(slots.size());
    std::vector<double> prev_s, prev_y;
    if (pushed) {
      for (int64_t i = 0; i + 1 < n; ++i) {
        prev_s.push_back(prods[2 * slots[i]]);
        prev_y.push_back(prods[2 * slots[i] + 1]);
      }
    }
    const int64_t rows = 2 * n;
    for (int64_t q = 0; q < rows; ++q) prods[q] = dot(row(q), g_new.data(), P);
    if (pushed && n > 1) {
      const int64_t k = n - 1;
      for (int64_t i = 0; i < k; ++i) {
        r(i, k) = prods[2 * slots[i]] - prev_s[i];
        const double v = prods[2 * slots[i] + 1] - prev_y[i];
        yy(i, k) = v;
        yy(k, i) = v;
      }
    }
  }
};

}  // namespace

LbfgsResult lbfgs(const Objective& fun, std::vector<double>& x, int64_t max_iter, double tol,
                  int64_t m, int64_t maxls) {
  const int64_t P = static_cast<int64_t>(x.size());
  LbfgsResult res;
  std::vector<double> g(P), g_new(P), d(P), xt(P);
  double f = fun(x.data(), g.data());
  res.f = f;
  if (!std::isfinite(f)) {
    res.status = LbfgsStatus::kNotFinite;
    return res;
  }
  if (P == 0 || absmax(g) <= tol) {
    res.status = LbfgsStatus::kStartGradientTol;
    return res;
  }
  History hist(P, m);
  LineSearch ls;
  int64_t n_iter = 0;
  while (n_iter < max_iter) {
    hist.direction(g, d);
    double gd = dot(g.data(), d.data(), P);
    if (!(gd < 0)) {  // rounding made the direction useless: steepest descent
      hist.slots.clear();
      for (int64_t j = 0; j < P; ++j) d[j] = -g[j];
      gd = dot(g.data(), d.data(), P);
    }
    if (!std::isfinite(gd)) {
      res.n_iter = n_iter, res.status = LbfgsStatus::kNotFinite, res.f = f;
      return res;
    }
    double t = (n_iter == 0 && hist.slots.empty())
                   ? std::min(1.0 / std::sqrt(dot(d.data(), d.data(), P)), ls.stpmax)
                   : 1.0;
    t = ls.start(t, f, gd);
    bool ok = false;
    double f_new = 0, dphi = 0;
    for (int64_t e = 0; e < maxls; ++e) {
      for (int64_t j = 0; j < P; ++j) xt[j] = d[j] * t + x[j];
      f_new = fun(xt.data(), g_new.data());
      dphi = dot(g_new.data(), d.data(), P);
      t = ls.step(f_new, dphi);
      if (ls.done) {
        ok = std::isfinite(f_new) && f_new <= f;
        break;
      }
    }
    if (!ok) {
      if (!hist.slots.empty()) {  // the quasi-Newton model misleads: restart
        hist.slots.clear();
        continue;
      }
      res.n_iter = n_iter, res.status = LbfgsStatus::kLineSearch, res.f = f;
      return res;
    }
    const double sy = t * (dphi - gd);
    const bool pushed = sy > kEps * (-gd * t);
    if (pushed) hist.push(d, t, g_new, g, sy);
    std::swap(x, xt);
    const double f_old = f;
    f = f_new;
    g = g_new;
    n_iter += 1;
    res.n_iter = n_iter, res.f = f;
    if (absmax(g) <= tol) {
      res.status = LbfgsStatus::kGradientTol;
      return res;
    }
    if ((f_old - f) <= kFtol * std::max({std::fabs(f_old), std::fabs(f), 1.0})) {
      res.status = LbfgsStatus::kFtol;
      return res;
    }
    hist.update_products(g, pushed);
  }
  res.status = LbfgsStatus::kMaxIter;
  return res;
}

}  // namespace fit
}  // namespace manual_layers
