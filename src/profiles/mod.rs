//! Device profiles and the workloads bound to them (device-worker-ng extension, PROTOCOL.md §7).
//!
//! The device configuration carries `profiles: [{name, conditions: [{name, expression}]}]`; each
//! condition is an expression over device variables ([`expr`]). A workload lists
//! `profiles: [{name, conditions: [{name, cpu: {cpu}}]}]`, naming device profiles and some of
//! their conditions. The rule, as in `[ng] internal/scheduler/scheduler.go`:
//!
//! - a workload's profile is **active** when at least one of the conditions it lists is true
//!   (a workload profile listing no condition is never active);
//! - the workload **may run** when all its profiles are active (no profiles: always);
//! - the `cpu` of a true condition is a cgroup `cpu.max` quota in µs per 100 000 µs period
//!   (`50000` = 0.5 CPU), and becomes the workload's cpu limit. When several true conditions
//!   carry a quota (several profiles, or several true conditions of one profile), the
//!   **smallest** wins: every active condition asked for at most that much, so honouring the
//!   strictest one honours them all. Quotas ≤ 0 mean "no quota" and are ignored.
//!
//! Everything here is pure: the controller samples the variables, calls [`DeviceProfiles::evaluate`]
//! and [`DeviceProfiles::workload_permission`], and acts on the answer.
//!
//! A configuration with a broken condition is not rejected as a whole: the other conditions keep
//! working, the broken one is always false, and [`DeviceProfiles::errors`] names it (profile,
//! condition, position) for `status` and the logs.

pub mod expr;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

pub use expr::{EvalError, Expr, ParseError, Unit, Value, Variables};

use crate::flotta::messages::{DeviceProfile, WorkloadProfile};

/// The length of the cgroup cpu period the protocol's quotas refer to (µs).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Profile name → condition name → value. Conditions that do not parse or that fail to
/// evaluate are `false`.
pub type Evaluation = BTreeMap<String, BTreeMap<String, bool>>;

/// One condition's outcome, with the reason when it could not be computed.
#[derive(Debug, Clone, PartialEq)]
pub enum ConditionOutcome {
    Value(bool),
    /// The expression did not parse (see [`DeviceProfiles::errors`]).
    Invalid,
    /// A variable arrived in a unit the expression cannot compare.
    Failed(EvalError),
}

impl ConditionOutcome {
    pub fn holds(&self) -> bool {
        matches!(self, ConditionOutcome::Value(true))
    }
}

/// A problem in the device's `profiles` configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProfileError {
    #[error("profile '{profile}' condition '{condition}': expression '{expression}' {error}")]
    Expression {
        profile: String,
        condition: String,
        expression: String,
        error: ParseError,
    },
    #[error("profile #{index} has no name and is ignored")]
    UnnamedProfile { index: usize },
    #[error("profile '{profile}': condition #{index} has no name and is ignored")]
    UnnamedCondition { profile: String, index: usize },
    #[error("profile '{profile}' is defined more than once; the first definition is used")]
    DuplicateProfile { profile: String },
    #[error("profile '{profile}': condition '{condition}' is defined more than once; the first definition is used")]
    DuplicateCondition { profile: String, condition: String },
}

/// One named condition of a device profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// The expression as configured.
    pub source: String,
    /// The parsed expression, or `None` when it did not parse.
    pub expr: Option<Expr>,
}

/// Whether a workload may run under the current profile evaluation, and with which cpu limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    pub allowed: bool,
    /// For `status`: which profiles are (in)active and why.
    pub reason: String,
    /// The cpu limit from the smallest quota of the true conditions (`None`: no quota, or not
    /// allowed). Rounded up, so any positive quota gives at least 1m.
    pub cpu_quota_millicores: Option<u64>,
}

/// The device's profiles, parsed once per configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceProfiles {
    profiles: BTreeMap<String, BTreeMap<String, Condition>>,
    errors: Vec<ProfileError>,
}

impl DeviceProfiles {
    /// Parses every condition of the configuration's `profiles`, keeping the ones that parse and
    /// collecting an error for each one that does not (or is unnamed or duplicated).
    pub fn from_config(profiles: &[DeviceProfile]) -> DeviceProfiles {
        let mut out = DeviceProfiles::default();
        for (index, profile) in profiles.iter().enumerate() {
            if profile.name.is_empty() {
                out.errors.push(ProfileError::UnnamedProfile { index });
                continue;
            }
            if out.profiles.contains_key(&profile.name) {
                out.errors.push(ProfileError::DuplicateProfile {
                    profile: profile.name.clone(),
                });
                continue;
            }
            let mut conditions = BTreeMap::new();
            for (index, condition) in profile.conditions.iter().enumerate() {
                if condition.name.is_empty() {
                    out.errors.push(ProfileError::UnnamedCondition {
                        profile: profile.name.clone(),
                        index,
                    });
                    continue;
                }
                if conditions.contains_key(&condition.name) {
                    out.errors.push(ProfileError::DuplicateCondition {
                        profile: profile.name.clone(),
                        condition: condition.name.clone(),
                    });
                    continue;
                }
                let expr = match Expr::parse(&condition.expression) {
                    Ok(expr) => Some(expr),
                    Err(error) => {
                        out.errors.push(ProfileError::Expression {
                            profile: profile.name.clone(),
                            condition: condition.name.clone(),
                            expression: condition.expression.clone(),
                            error,
                        });
                        None
                    }
                };
                conditions.insert(
                    condition.name.clone(),
                    Condition {
                        source: condition.expression.clone(),
                        expr,
                    },
                );
            }
            out.profiles.insert(profile.name.clone(), conditions);
        }
        out
    }

    /// The configuration problems found by [`DeviceProfiles::from_config`].
    pub fn errors(&self) -> &[ProfileError] {
        &self.errors
    }

    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    /// Profile name → condition name → condition.
    pub fn profiles(&self) -> &BTreeMap<String, BTreeMap<String, Condition>> {
        &self.profiles
    }

    pub fn condition(&self, profile: &str, condition: &str) -> Option<&Condition> {
        self.profiles.get(profile)?.get(condition)
    }

    /// Every variable some valid condition reads (what the sampler and the local input must
    /// provide).
    pub fn variables(&self) -> BTreeSet<String> {
        self.profiles
            .values()
            .flat_map(|conditions| conditions.values())
            .filter_map(|c| c.expr.as_ref())
            .flat_map(|e| e.variables())
            .map(str::to_string)
            .collect()
    }

    /// Every condition's outcome, with the reason when it is not a plain value.
    pub fn evaluate_detailed<V: Variables + ?Sized>(
        &self,
        vars: &V,
    ) -> BTreeMap<String, BTreeMap<String, ConditionOutcome>> {
        self.profiles
            .iter()
            .map(|(name, conditions)| {
                let outcomes = conditions
                    .iter()
                    .map(|(cname, c)| {
                        let outcome = match &c.expr {
                            None => ConditionOutcome::Invalid,
                            Some(e) => match e.eval(vars) {
                                Ok(b) => ConditionOutcome::Value(b),
                                Err(err) => ConditionOutcome::Failed(err),
                            },
                        };
                        (cname.clone(), outcome)
                    })
                    .collect();
                (name.clone(), outcomes)
            })
            .collect()
    }

    /// Every condition's value; invalid and failing conditions are false.
    pub fn evaluate<V: Variables + ?Sized>(&self, vars: &V) -> Evaluation {
        self.evaluate_detailed(vars)
            .into_iter()
            .map(|(name, outcomes)| {
                let values = outcomes.into_iter().map(|(c, o)| (c, o.holds())).collect();
                (name, values)
            })
            .collect()
    }

    /// Applies the workload rule (module documentation) to `evaluation`.
    pub fn workload_permission(
        &self,
        workload_profiles: &[WorkloadProfile],
        evaluation: &Evaluation,
    ) -> Permission {
        if workload_profiles.is_empty() {
            return Permission {
                allowed: true,
                reason: "no profiles".to_string(),
                cpu_quota_millicores: None,
            };
        }
        let mut blocked: Vec<String> = Vec::new();
        let mut active: Vec<String> = Vec::new();
        // (quota µs, profile, condition) of the smallest quota among true conditions.
        let mut quota: Option<(u64, &str, &str)> = None;
        for wp in workload_profiles {
            let Some(conditions) = self.profiles.get(&wp.name) else {
                blocked.push(format!(
                    "profile '{}' is not defined on the device",
                    wp.name
                ));
                continue;
            };
            if wp.conditions.is_empty() {
                blocked.push(format!(
                    "profile '{}': the workload lists no condition",
                    wp.name
                ));
                continue;
            }
            let mut true_names = Vec::new();
            let mut why_false = Vec::new();
            for wc in &wp.conditions {
                let value = evaluation
                    .get(&wp.name)
                    .and_then(|values| values.get(&wc.name))
                    .copied();
                match (conditions.get(&wc.name), value) {
                    (None, _) => why_false.push(format!("{}: not defined", wc.name)),
                    (Some(c), _) if c.expr.is_none() => {
                        why_false.push(format!("{}: invalid expression '{}'", wc.name, c.source))
                    }
                    (Some(_), None) => why_false.push(format!("{}: not evaluated", wc.name)),
                    (Some(c), Some(false)) => {
                        let shown = c.expr.as_ref().map_or(c.source.clone(), |e| e.to_string());
                        why_false.push(format!("{}: {} is false", wc.name, shown));
                    }
                    (Some(_), Some(true)) => {
                        true_names.push(wc.name.as_str());
                        let q = wc.cpu.as_ref().and_then(|r| r.cpu).unwrap_or(0);
                        if let Ok(q @ 1..) = u64::try_from(q) {
                            if quota.map_or(true, |(best, _, _)| q < best) {
                                quota = Some((q, &wp.name, &wc.name));
                            }
                        }
                    }
                }
            }
            if true_names.is_empty() {
                blocked.push(format!(
                    "profile '{}': no condition true ({})",
                    wp.name,
                    why_false.join("; ")
                ));
            } else {
                active.push(format!("'{}' ({})", wp.name, true_names.join(", ")));
            }
        }
        if !blocked.is_empty() {
            return Permission {
                allowed: false,
                reason: blocked.join("; "),
                cpu_quota_millicores: None,
            };
        }
        let mut reason = format!("profiles active: {}", active.join(", "));
        let millicores = quota.map(|(q, profile, condition)| {
            let m = q.div_ceil(CPU_PERIOD_US / 1000);
            let _ = write!(
                reason,
                "; cpu limited to {m}m by {profile}/{condition} (quota {q} of {CPU_PERIOD_US} µs)"
            );
            m
        });
        Permission {
            allowed: true,
            reason,
            cpu_quota_millicores: millicores,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flotta::messages::{
        ProfileCondition, ResourceQuota, WorkloadProfile, WorkloadProfileCondition,
    };

    fn device(profiles: &[(&str, &[(&str, &str)])]) -> Vec<DeviceProfile> {
        profiles
            .iter()
            .map(|(name, conds)| DeviceProfile {
                name: name.to_string(),
                conditions: conds
                    .iter()
                    .map(|(n, e)| ProfileCondition {
                        name: n.to_string(),
                        expression: e.to_string(),
                    })
                    .collect(),
            })
            .collect()
    }

    fn wl(name: &str, conds: &[(&str, Option<i64>)]) -> WorkloadProfile {
        WorkloadProfile {
            name: name.to_string(),
            conditions: conds
                .iter()
                .map(|(n, cpu)| WorkloadProfileCondition {
                    name: n.to_string(),
                    cpu: cpu.map(|c| ResourceQuota { cpu: Some(c) }),
                })
                .collect(),
        }
    }

    fn vars(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn sample() -> DeviceProfiles {
        DeviceProfiles::from_config(&device(&[
            (
                "hot",
                &[
                    ("overheat", "temperature > 70"),
                    ("cool", "temperature < 20 || temperature == nil"),
                ],
            ),
            ("load", &[("low", "cpu < 25%"), ("high", "cpu >= 75%")]),
        ]))
    }

    #[test]
    fn builds_and_evaluates() {
        let dp = sample();
        assert!(dp.errors().is_empty());
        assert_eq!(
            dp.variables().into_iter().collect::<Vec<_>>(),
            ["cpu", "temperature"]
        );
        let ev = dp.evaluate(&vars(&[
            ("temperature", Value::plain(80.0)),
            ("cpu", Value::percent(10.0)),
        ]));
        assert!(ev["hot"]["overheat"]);
        assert!(!ev["hot"]["cool"]);
        assert!(ev["load"]["low"]);
        assert!(!ev["load"]["high"]);
        let ev = dp.evaluate(&vars(&[]));
        assert!(!ev["hot"]["overheat"]);
        assert!(ev["hot"]["cool"]);
        assert!(!ev["load"]["low"]);
    }

    #[test]
    fn collects_errors_with_names() {
        let dp = DeviceProfiles::from_config(&device(&[
            (
                "a",
                &[("ok", "cpu > 5%"), ("bad", "cpu > 5"), ("", "x > 1")],
            ),
            ("a", &[("later", "x > 1")]),
            ("", &[]),
            (
                "b",
                &[
                    ("dup", "x > 1"),
                    ("dup", "x > 2"),
                    ("chain", "a > 1 && b > 1 &&"),
                ],
            ),
        ]));
        let msgs: Vec<String> = dp.errors().iter().map(|e| e.to_string()).collect();
        assert_eq!(
            msgs,
            [
                "profile 'a' condition 'bad': expression 'cpu > 5' at column 7: 'cpu' is a percentage (%), but '5' is a plain number",
                "profile 'a': condition #2 has no name and is ignored",
                "profile 'a' is defined more than once; the first definition is used",
                "profile #2 has no name and is ignored",
                "profile 'b': condition 'dup' is defined more than once; the first definition is used",
                "profile 'b' condition 'chain': expression 'a > 1 && b > 1 &&' at column 18: expected a comparison (a variable, a number or 'nil'), '!' or '(', found the end of the expression",
            ]
        );
        assert!(dp.condition("a", "ok").unwrap().expr.is_some());
        assert!(dp.condition("a", "bad").unwrap().expr.is_none());
        assert!(dp.condition("a", "later").is_none());
        assert_eq!(dp.condition("b", "dup").unwrap().source, "x > 1");
        let all = |_: &str| Some(Value::percent(50.0));
        let detailed = dp.evaluate_detailed(&all);
        assert_eq!(detailed["a"]["ok"], ConditionOutcome::Value(true));
        assert_eq!(detailed["a"]["bad"], ConditionOutcome::Invalid);
        // x arrives as a percentage but is compared with a plain number
        assert!(matches!(detailed["b"]["dup"], ConditionOutcome::Failed(_)));
        assert!(!dp.evaluate(&all)["b"]["dup"]);
    }

    #[test]
    fn workload_rule() {
        let dp = sample();
        let hot_low = dp.evaluate(&vars(&[
            ("temperature", Value::plain(80.0)),
            ("cpu", Value::percent(10.0)),
        ]));
        let cool_high = dp.evaluate(&vars(&[
            ("temperature", Value::plain(10.0)),
            ("cpu", Value::percent(90.0)),
        ]));

        let p = dp.workload_permission(&[], &hot_low);
        assert_eq!(
            (p.allowed, p.reason.as_str(), p.cpu_quota_millicores),
            (true, "no profiles", None)
        );

        // one listed condition true is enough for the profile
        let w = [wl("hot", &[("overheat", Some(50_000)), ("cool", None)])];
        let p = dp.workload_permission(&w, &hot_low);
        assert!(p.allowed, "{p:?}");
        assert_eq!(p.cpu_quota_millicores, Some(500));
        assert_eq!(
            p.reason,
            "profiles active: 'hot' (overheat); cpu limited to 500m by hot/overheat (quota 50000 of 100000 µs)"
        );
        // the quota belongs to the true condition only
        let p = dp.workload_permission(&w, &cool_high);
        assert!(p.allowed);
        assert_eq!(p.cpu_quota_millicores, None);
        assert_eq!(p.reason, "profiles active: 'hot' (cool)");

        // all profiles must be active
        let w = [
            wl("hot", &[("overheat", Some(50_000))]),
            wl("load", &[("low", Some(20_000))]),
        ];
        let p = dp.workload_permission(&w, &hot_low);
        assert!(p.allowed);
        assert_eq!(p.cpu_quota_millicores, Some(200), "smallest quota wins");
        let p = dp.workload_permission(&w, &cool_high);
        assert!(!p.allowed);
        assert_eq!(p.cpu_quota_millicores, None);
        assert_eq!(
            p.reason,
            "profile 'hot': no condition true (overheat: temperature > 70 is false); \
             profile 'load': no condition true (low: cpu < 25% is false)"
        );
    }

    #[test]
    fn quota_choice_and_rounding() {
        let dp = DeviceProfiles::from_config(&device(&[(
            "p",
            &[("a", "x == nil"), ("b", "y == nil"), ("c", "z == nil")],
        )]));
        let ev = dp.evaluate(&vars(&[]));
        let quota = |conds: &[(&str, Option<i64>)]| {
            dp.workload_permission(&[wl("p", conds)], &ev)
                .cpu_quota_millicores
        };
        assert_eq!(
            quota(&[("a", Some(150_000)), ("b", Some(70_000))]),
            Some(700)
        );
        assert_eq!(quota(&[("a", None), ("b", Some(70_000))]), Some(700));
        assert_eq!(
            quota(&[("a", Some(0)), ("b", Some(-1))]),
            None,
            "non-positive is no quota"
        );
        assert_eq!(quota(&[("a", Some(1))]), Some(1), "rounded up");
        assert_eq!(quota(&[("a", Some(150))]), Some(2));
        assert_eq!(quota(&[("a", Some(200_000))]), Some(2000));
    }

    #[test]
    fn unknown_names_and_invalid_conditions_block_with_reasons() {
        let dp =
            DeviceProfiles::from_config(&device(&[("p", &[("bad", "x >"), ("ok", "x == nil")])]));
        let ev = dp.evaluate(&vars(&[]));
        let reason = |w: &[WorkloadProfile]| {
            let p = dp.workload_permission(w, &ev);
            assert!(!p.allowed);
            p.reason
        };
        assert_eq!(
            reason(&[wl("q", &[("a", None)])]),
            "profile 'q' is not defined on the device"
        );
        assert_eq!(
            reason(&[wl("p", &[])]),
            "profile 'p': the workload lists no condition"
        );
        assert_eq!(
            reason(&[wl("p", &[("bad", None), ("nope", None)])]),
            "profile 'p': no condition true (bad: invalid expression 'x >'; nope: not defined)"
        );
        // an evaluation from an older configuration lacks the condition
        let p = dp.workload_permission(&[wl("p", &[("ok", None)])], &Evaluation::new());
        assert_eq!(
            p.reason,
            "profile 'p': no condition true (ok: not evaluated)"
        );
    }
}
