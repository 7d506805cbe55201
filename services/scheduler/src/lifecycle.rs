//! The plan lifecycle: one pure state machine, [`step`], from a plan's
//! [`Phase`] and an [`Event`] to the next phase and the [`Effect`]s that
//! get it there. This module does no I/O; the edges ([`crate::completion`],
//! [`crate::integration`], [`crate::deploy`]) read the store, call [`step`]
//! and perform the effects ([`crate::completion::advance`]).
//!
//! # The machine
//!
//! | phase       | event                          | plan has            | next        | effects |
//! |-------------|--------------------------------|---------------------|-------------|---------|
//! | Running     | TaskFailed                     |                     | Running     | Announce (`<path> failed: …`) |
//! | any live    | TasksFinished, a task failed/blocked |               | Failed      | End (`N task(s) failed: …`) |
//! | any live    | TasksFinished                  | unreadable stages   | Failed      | End (the reason) |
//! | Running     | TasksFinished                  | integration         | Integrating | Enter, PublishShards, TallyIntegration |
//! | Running     | TasksFinished                  | deploy only         | Deploying   | Enter, RequestDeploy |
//! | Running     | TasksFinished                  | neither             | Succeeded   | End |
//! | Integrating | TasksFinished                  |                     | Integrating | PublishShards, TallyIntegration (repair) |
//! | Integrating | IntegrationTallied(Pending)    |                     | Integrating | — |
//! | Integrating | IntegrationTallied(Passed)     | deploy              | Deploying   | ClaimVerdict, Enter, RequestDeploy |
//! | Integrating | IntegrationTallied(Passed)     | no deploy           | Succeeded   | ClaimVerdict, End |
//! | Integrating | IntegrationTallied(Failed)     |                     | Failed      | ClaimVerdict, End, EscalateIntegration |
//! | Integrating | IntegrationTallied(Passed)     | unreadable stages   | Failed      | End (the reason) |
//! | Deploying   | TasksFinished, IntegrationTallied | deploy           | Deploying   | RequestDeploy (repair) |
//! | Deploying   | DeployFinished                 |                     | Succeeded / Failed | End |
//! | Succeeded, Failed | anything                 |                     | unchanged   | — |
//! | any other pair |                             |                     | unchanged   | — |
//!
//! "Any live" is Running, Integrating or Deploying. The unit tests restate
//! this table and check every (phase, event, stages) combination against it.
//!
//! # Guarantees the edges rely on
//!
//! * Final phases are final: no event leaves Succeeded or Failed.
//! * Events come at least once, so a repeated event is harmless: after a
//!   transition, the same event again changes no phase and asks only for
//!   *repair* effects ([`Effect::is_repair`]), which the edges make
//!   idempotent with the stage markers of [`crate::stages`]. (TaskFailed is
//!   fed only when the store says the task newly failed, so it is not
//!   repeated.)
//! * Every message a plan ends with is worded here, once: a plan failed by
//!   its tasks reads the same whether the last task failed at the router,
//!   at the direct seam, or completed.
//!
//! # Adding a phase
//!
//! The next phases are additions: a variant of [`Phase`] (and of
//! `PlanStatus` if users should see it, additively), the events that enter
//! and leave it, and their rows in [`step`] and in the table test. The
//! compiler points at every `match` that must learn the new variant. For
//! example:
//!
//! * `BudgetExhausted` (resumable): Running + a `BudgetSpent` event →
//!   BudgetExhausted with a `Pause` effect; a `Resumed` event → Running.
//! * `AwaitingReplan`: Running + TaskFailed, when the plan has a planner →
//!   AwaitingReplan with a `RequestReplan` effect; `Replanned` → Running.
//! * `FixRound { round }`: Integrating + IntegrationTallied(Failed) with
//!   rounds left → FixRound with a `QueueFixTasks` effect; its tasks
//!   finishing (TasksFinished) → Integrating again.
//! * `WaitingForCapability`: Running + a `NoCapableWorker` event →
//!   WaitingForCapability; `CapabilityAvailable` → Running.
//!
//! A phase that must survive a restart needs its own status in the store;
//! one decided from the store's counts and markers alone (like Integrating
//! today) needs none.

use devfleet_protocol::PlanStatus;

/// Longest plan status message, in characters.
pub const MAX_MESSAGE_CHARS: usize = 2_000;

/// Where a plan is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Its tasks are being built.
    Running,
    /// Every task is Done; the integration shards run on qa-workers.
    Integrating,
    /// The rollout was requested; the canary decides the outcome.
    Deploying,
    /// Final: every stage passed.
    Succeeded,
    /// Final: a task, the integration or the rollout failed.
    Failed,
}

impl Phase {
    /// Every phase, for tests and documentation.
    pub const ALL: [Phase; 5] = [
        Phase::Running,
        Phase::Integrating,
        Phase::Deploying,
        Phase::Succeeded,
        Phase::Failed,
    ];

    /// The phase of a stored plan status. Statuses from before the
    /// scheduler (submitted, analyzed) count as Running; a rejected plan
    /// is final like a failed one. A plan whose budget ran out
    /// (`budget_exhausted`) is a Running plan that the store does not
    /// hand out work of (`TaskStore::claim_next` skips it): at least one
    /// of its tasks is unfinished (the one handed back), so no lifecycle
    /// transition applies until `devfleet budget` lets it run again.
    pub fn of(status: PlanStatus) -> Phase {
        match status {
            PlanStatus::Submitted
            | PlanStatus::Analyzed
            | PlanStatus::Running
            | PlanStatus::BudgetExhausted => Phase::Running,
            PlanStatus::Integrating => Phase::Integrating,
            PlanStatus::Deploying => Phase::Deploying,
            PlanStatus::Succeeded => Phase::Succeeded,
            PlanStatus::Failed | PlanStatus::Rejected => Phase::Failed,
        }
    }

    /// The status stored (and shown) for this phase.
    pub fn status(self) -> PlanStatus {
        match self {
            Phase::Running => PlanStatus::Running,
            Phase::Integrating => PlanStatus::Integrating,
            Phase::Deploying => PlanStatus::Deploying,
            Phase::Succeeded => PlanStatus::Succeeded,
            Phase::Failed => PlanStatus::Failed,
        }
    }

    /// True once no event changes the plan any more.
    pub fn is_final(self) -> bool {
        match self {
            Phase::Running | Phase::Integrating | Phase::Deploying => false,
            Phase::Succeeded | Phase::Failed => true,
        }
    }

    /// Order of the live phases, so a repair never moves a plan backwards.
    fn rank(self) -> u8 {
        match self {
            Phase::Running => 0,
            Phase::Integrating => 1,
            Phase::Deploying => 2,
            Phase::Succeeded | Phase::Failed => 3,
        }
    }

    /// True when a plan in this phase has not reached `target` yet (so a
    /// status write for `target` left undone by an interrupted caller may
    /// be repeated).
    pub fn is_before(self, target: Phase) -> bool {
        self.rank() < target.rank()
    }
}

/// What follows a plan's tasks, as far as the lifecycle needs to know.
#[derive(Debug, Clone, PartialEq)]
pub enum Stages {
    /// Read from the analyzed plan.
    Known {
        /// Integration steps (0: no integration stage).
        steps: usize,
        /// Integration shards over all steps.
        shards: usize,
        /// Canary stages (traffic percentages) when the plan has a `deploy`
        /// section.
        deploy: Option<Vec<u8>>,
    },
    /// The stored analysis cannot be read; the reason, for the plan.
    Unreadable(String),
}

impl Stages {
    /// No integration and no deploy.
    pub const NONE: Stages = Stages::Known {
        steps: 0,
        shards: 0,
        deploy: None,
    };
}

/// A plan as the lifecycle sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub id: String,
    pub phase: Phase,
    pub stages: Stages,
}

/// A task that failed, for the plan's message.
#[derive(Debug, Clone, PartialEq)]
pub struct FailedTask {
    pub path: String,
    /// The reason recorded with the failure.
    pub error: Option<String>,
}

/// A plan's tasks once every one is final.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tasks {
    pub done: u32,
    pub blocked: u32,
    pub total: u32,
    /// Every Failed task (empty when none failed).
    pub failed: Vec<FailedTask>,
}

/// The integration results recorded so far, tallied.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Some shards have not reported.
    Pending { missing: usize },
    /// Every shard passed.
    Passed,
    /// Every shard reported and some failed; the summary names them.
    Failed { summary: String },
}

/// What happened to a plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A task failed for good (reported by the router, or by the direct
    /// seam), and `blocked` dependents were blocked with it. Fed once per
    /// failure: only when the store says the task newly failed.
    TaskFailed {
        path: String,
        error: String,
        blocked: usize,
    },
    /// Every task of the plan is final. May come any number of times (each
    /// redelivered completion or failure of the last task repeats it).
    TasksFinished(Tasks),
    /// An integration result was recorded (or the stage was entered) and
    /// this is the tally of everything recorded.
    IntegrationTallied(Verdict),
    /// The canary finished the plan's rollout (`deploy.finished`).
    DeployFinished { promoted: bool, message: String },
}

/// What an edge must do to carry out a transition, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// `plan.event` with the plan's current status and this message.
    Announce { message: String },
    /// Move the plan to a later live phase (status, `plan.event`, metric),
    /// once: claimed with the phase's stage marker; a repeat only writes a
    /// status an interrupted caller left unwritten.
    Enter { phase: Phase, message: String },
    /// Publish every integration shard, unless already confirmed.
    PublishShards,
    /// Tally the recorded integration results and step again with
    /// [`Event::IntegrationTallied`] (the results may all be in already).
    TallyIntegration,
    /// Claim the integration verdict; the effects after it are carried out
    /// only by the caller that claimed it, or when the plan is still
    /// Integrating (the claimer stopped before moving it on).
    ClaimVerdict { passed: bool },
    /// Publish `deploy.requested`, unless already confirmed.
    RequestDeploy,
    /// End the plan: final status, message, `plan.event` and metric.
    End {
        phase: Phase,
        message: Option<String>,
    },
    /// An `escalation` event and an error metric naming the failed
    /// integration shards.
    EscalateIntegration,
}

impl Effect {
    /// True for effects an edge makes idempotent (a stage marker says
    /// whether it was done), so repeating them is a repair, not a second
    /// transition.
    pub fn is_repair(&self) -> bool {
        match self {
            Effect::PublishShards | Effect::TallyIntegration | Effect::RequestDeploy => true,
            Effect::Announce { .. }
            | Effect::Enter { .. }
            | Effect::ClaimVerdict { .. }
            | Effect::End { .. }
            | Effect::EscalateIntegration => false,
        }
    }
}

/// The result of one [`step`].
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The phase once the effects are carried out.
    pub next: Phase,
    pub effects: Vec<Effect>,
}

impl Transition {
    fn stay(phase: Phase) -> Transition {
        Transition {
            next: phase,
            effects: Vec::new(),
        }
    }

    fn to(next: Phase, effects: Vec<Effect>) -> Transition {
        Transition { next, effects }
    }
}

/// The plan lifecycle: the next phase of `plan` after `event`, and what to
/// do to get there. Pure; see the module docs for the table.
pub fn step(plan: &Plan, event: &Event) -> Transition {
    let phase = plan.phase;
    if phase.is_final() {
        return Transition::stay(phase);
    }
    match event {
        Event::TaskFailed {
            path,
            error,
            blocked,
        } => match phase {
            Phase::Running => Transition::to(
                phase,
                vec![Effect::Announce {
                    message: truncate(format!(
                        "{path} failed: {error}; {blocked} dependent(s) blocked"
                    )),
                }],
            ),
            // Every task is Done past Running: a failure now is stale.
            _ => Transition::stay(phase),
        },
        Event::TasksFinished(tasks) => tasks_finished(plan, tasks),
        Event::IntegrationTallied(verdict) => match phase {
            Phase::Integrating => tallied(plan, verdict),
            Phase::Deploying => repair_deploy(plan),
            // Before the stage, entering it tallies; the result is kept.
            _ => Transition::stay(phase),
        },
        Event::DeployFinished { promoted, message } => match phase {
            Phase::Deploying => {
                let next = if *promoted {
                    Phase::Succeeded
                } else {
                    Phase::Failed
                };
                Transition::to(
                    next,
                    vec![Effect::End {
                        phase: next,
                        message: Some(truncate(message.clone())),
                    }],
                )
            }
            // Not waiting for a rollout: not this plan's outcome.
            _ => Transition::stay(phase),
        },
    }
}

fn tasks_finished(plan: &Plan, tasks: &Tasks) -> Transition {
    if !tasks.failed.is_empty() || tasks.blocked > 0 {
        return end(Phase::Failed, Some(failed_tasks_message(tasks)));
    }
    let (steps, shards, deploy) = match &plan.stages {
        Stages::Unreadable(reason) => return end(Phase::Failed, Some(truncate(reason.clone()))),
        Stages::Known {
            steps,
            shards,
            deploy,
        } => (*steps, *shards, deploy),
    };
    match plan.phase {
        Phase::Running if steps > 0 => Transition::to(
            Phase::Integrating,
            vec![
                Effect::Enter {
                    phase: Phase::Integrating,
                    message: format!("integration: {shards} shard(s) of {steps} step(s)"),
                },
                Effect::PublishShards,
                Effect::TallyIntegration,
            ],
        ),
        Phase::Running => match deploy {
            Some(_) => enter_deploy(plan),
            None => end(Phase::Succeeded, None),
        },
        // Repeated: finish what an interrupted caller may have left.
        Phase::Integrating => Transition::to(
            Phase::Integrating,
            vec![Effect::PublishShards, Effect::TallyIntegration],
        ),
        Phase::Deploying => repair_deploy(plan),
        Phase::Succeeded | Phase::Failed => Transition::stay(plan.phase),
    }
}

fn tallied(plan: &Plan, verdict: &Verdict) -> Transition {
    match verdict {
        Verdict::Pending { .. } => Transition::stay(plan.phase),
        Verdict::Failed { summary } => Transition::to(
            Phase::Failed,
            vec![
                Effect::ClaimVerdict { passed: false },
                Effect::End {
                    phase: Phase::Failed,
                    message: Some(truncate(summary.trim_end().to_owned())),
                },
                Effect::EscalateIntegration,
            ],
        ),
        Verdict::Passed => {
            let (steps, shards, deploy) = match &plan.stages {
                Stages::Known {
                    steps,
                    shards,
                    deploy,
                } => (*steps, *shards, deploy.is_some()),
                // A verdict implies the stages were read (results for a
                // plan whose stages cannot be read are dead-lettered).
                Stages::Unreadable(reason) => {
                    return end(Phase::Failed, Some(truncate(reason.clone())))
                }
            };
            let mut t = if deploy {
                enter_deploy(plan)
            } else {
                end(
                    Phase::Succeeded,
                    Some(format!(
                        "integration passed: {shards} shard(s) of {steps} step(s)"
                    )),
                )
            };
            t.effects.insert(0, Effect::ClaimVerdict { passed: true });
            t
        }
    }
}

fn enter_deploy(plan: &Plan) -> Transition {
    let stages = match &plan.stages {
        Stages::Known {
            deploy: Some(stages),
            ..
        } => stages.as_slice(),
        _ => &[],
    };
    Transition::to(
        Phase::Deploying,
        vec![
            Effect::Enter {
                phase: Phase::Deploying,
                message: format!(
                    "canary rollout requested (deployment '{}', stages {stages:?})",
                    plan.id
                ),
            },
            Effect::RequestDeploy,
        ],
    )
}

/// Deploying already: make sure the request went out.
fn repair_deploy(plan: &Plan) -> Transition {
    match &plan.stages {
        Stages::Known {
            deploy: Some(_), ..
        } => Transition::to(Phase::Deploying, vec![Effect::RequestDeploy]),
        _ => Transition::stay(plan.phase),
    }
}

fn end(phase: Phase, message: Option<String>) -> Transition {
    Transition::to(phase, vec![Effect::End { phase, message }])
}

/// The message of a plan that failed because some of its tasks did: the
/// one wording, wherever the failure started.
pub fn failed_tasks_message(tasks: &Tasks) -> String {
    let failed: Vec<String> = tasks
        .failed
        .iter()
        .map(|t| {
            format!(
                "{} ({})",
                t.path,
                t.error.as_deref().unwrap_or("no error recorded")
            )
        })
        .collect();
    truncate(format!(
        "{} task(s) failed: {}; {} blocked; {} of {} done",
        failed.len(),
        failed.join(", "),
        tasks.blocked,
        tasks.done,
        tasks.total
    ))
}

/// Cuts a plan message to [`MAX_MESSAGE_CHARS`] characters.
pub fn truncate(mut s: String) -> String {
    if s.chars().count() > MAX_MESSAGE_CHARS {
        s = s.chars().take(MAX_MESSAGE_CHARS).collect::<String>() + "…";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- the samples: one or more of every event and every kind of plan ----

    /// A short name per event sample. The match is exhaustive on purpose:
    /// a new event does not compile until it has samples and rows here.
    fn event_name(e: &Event) -> &'static str {
        match e {
            Event::TaskFailed { .. } => "task_failed",
            Event::TasksFinished(t) if !t.failed.is_empty() => "finished_failed",
            Event::TasksFinished(t) if t.blocked > 0 => "finished_blocked",
            Event::TasksFinished(_) => "finished_ok",
            Event::IntegrationTallied(Verdict::Pending { .. }) => "tally_pending",
            Event::IntegrationTallied(Verdict::Passed) => "tally_passed",
            Event::IntegrationTallied(Verdict::Failed { .. }) => "tally_failed",
            Event::DeployFinished { promoted: true, .. } => "deploy_promoted",
            Event::DeployFinished {
                promoted: false, ..
            } => "deploy_rolled_back",
        }
    }

    fn events() -> Vec<Event> {
        let failed = FailedTask {
            path: "b.py".into(),
            error: Some("boom".into()),
        };
        vec![
            Event::TaskFailed {
                path: "b.py".into(),
                error: "boom".into(),
                blocked: 2,
            },
            Event::TasksFinished(Tasks {
                done: 1,
                blocked: 1,
                total: 3,
                failed: vec![failed],
            }),
            Event::TasksFinished(Tasks {
                done: 2,
                blocked: 1,
                total: 3,
                failed: vec![],
            }),
            Event::TasksFinished(Tasks {
                done: 3,
                blocked: 0,
                total: 3,
                failed: vec![],
            }),
            Event::IntegrationTallied(Verdict::Pending { missing: 1 }),
            Event::IntegrationTallied(Verdict::Passed),
            Event::IntegrationTallied(Verdict::Failed {
                summary: "integration step 'unit' shard 1/1 failed:\nboom\n".into(),
            }),
            Event::DeployFinished {
                promoted: true,
                message: "deployment 'p' promoted".into(),
            },
            Event::DeployFinished {
                promoted: false,
                message: "deployment 'p' rolled back: errors".into(),
            },
        ]
    }

    fn stages() -> Vec<(&'static str, Stages)> {
        vec![
            ("none", Stages::NONE),
            (
                "integration",
                Stages::Known {
                    steps: 2,
                    shards: 3,
                    deploy: None,
                },
            ),
            (
                "deploy",
                Stages::Known {
                    steps: 0,
                    shards: 0,
                    deploy: Some(vec![10, 100]),
                },
            ),
            (
                "both",
                Stages::Known {
                    steps: 2,
                    shards: 3,
                    deploy: Some(vec![10, 100]),
                },
            ),
            ("unreadable", Stages::Unreadable("cannot read".into())),
        ]
    }

    fn phase_name(p: Phase) -> &'static str {
        match p {
            Phase::Running => "running",
            Phase::Integrating => "integrating",
            Phase::Deploying => "deploying",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
        }
    }

    fn effect_name(e: &Effect) -> String {
        match e {
            Effect::Announce { .. } => "announce".into(),
            Effect::Enter { phase, .. } => format!("enter({})", phase_name(*phase)),
            Effect::PublishShards => "publish_shards".into(),
            Effect::TallyIntegration => "tally".into(),
            Effect::ClaimVerdict { passed } => {
                format!("claim({})", if *passed { "passed" } else { "failed" })
            }
            Effect::RequestDeploy => "request_deploy".into(),
            Effect::End { phase, .. } => format!("end({})", phase_name(*phase)),
            Effect::EscalateIntegration => "escalate".into(),
        }
    }

    fn plan(phase: Phase, stages: Stages) -> Plan {
        Plan {
            id: "p".into(),
            phase,
            stages,
        }
    }

    /// The documented transitions, restated independently of `step`:
    /// `phase event stages -> next effects...`, first match wins, `*`
    /// matches anything, and `live` matches every non-final phase. Every
    /// row must be used by some combination.
    const TABLE: &str = "
        succeeded   *                 *           -> succeeded
        failed      *                 *           -> failed
        running     task_failed       *           -> running     announce
        live        task_failed       *           -> same
        live        finished_failed   *           -> failed      end(failed)
        live        finished_blocked  *           -> failed      end(failed)
        live        finished_ok       unreadable  -> failed      end(failed)
        running     finished_ok       integration -> integrating enter(integrating) publish_shards tally
        running     finished_ok       both        -> integrating enter(integrating) publish_shards tally
        running     finished_ok       deploy      -> deploying   enter(deploying) request_deploy
        running     finished_ok       none        -> succeeded   end(succeeded)
        integrating finished_ok       *           -> integrating publish_shards tally
        deploying   finished_ok       deploy      -> deploying   request_deploy
        deploying   finished_ok       both        -> deploying   request_deploy
        deploying   finished_ok       *           -> deploying
        running     tally_*           *           -> running
        integrating tally_pending     *           -> integrating
        integrating tally_failed      *           -> failed      claim(failed) end(failed) escalate
        integrating tally_passed      both        -> deploying   claim(passed) enter(deploying) request_deploy
        integrating tally_passed      deploy      -> deploying   claim(passed) enter(deploying) request_deploy
        integrating tally_passed      unreadable  -> failed      end(failed)
        integrating tally_passed      *           -> succeeded   claim(passed) end(succeeded)
        deploying   tally_*           deploy      -> deploying   request_deploy
        deploying   tally_*           both        -> deploying   request_deploy
        deploying   tally_*           *           -> deploying
        deploying   deploy_promoted   *           -> succeeded   end(succeeded)
        deploying   deploy_rolled_back *          -> failed      end(failed)
        live        deploy_*          *           -> same
    ";

    struct Row {
        phase: String,
        event: String,
        stages: String,
        next: String,
        effects: Vec<String>,
        used: bool,
    }

    fn rows() -> Vec<Row> {
        TABLE
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (lhs, rhs) = l.split_once("->").expect("a row has ->");
                let lhs: Vec<&str> = lhs.split_whitespace().collect();
                let mut rhs = rhs.split_whitespace().map(str::to_owned);
                Row {
                    phase: lhs[0].into(),
                    event: lhs[1].into(),
                    stages: lhs[2].into(),
                    next: rhs.next().expect("a row names the next phase"),
                    effects: rhs.collect(),
                    used: false,
                }
            })
            .collect()
    }

    fn matches(pattern: &str, value: &str) -> bool {
        match pattern.strip_suffix('*') {
            Some(prefix) => value.starts_with(prefix),
            None => pattern == value,
        }
    }

    #[test]
    fn every_phase_event_and_stages_combination_has_its_documented_transition() {
        let mut table = rows();
        let mut checked = 0;
        for phase in Phase::ALL {
            for event in events() {
                for (stages_name, stages) in stages() {
                    let (p, e) = (phase_name(phase), event_name(&event));
                    let row = table
                        .iter_mut()
                        .find(|r| {
                            (r.phase == p || (r.phase == "live" && !phase.is_final()))
                                && matches(&r.event, e)
                                && matches(&r.stages, stages_name)
                        })
                        .unwrap_or_else(|| panic!("no row for {p} {e} {stages_name}"));
                    row.used = true;
                    let expected_next = if row.next == "same" { p } else { &row.next };
                    let t = step(&plan(phase, stages), &event);
                    let got: Vec<String> = t.effects.iter().map(effect_name).collect();
                    assert_eq!(
                        (phase_name(t.next), got),
                        (expected_next, row.effects.clone()),
                        "{p} + {e} with stages {stages_name}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, Phase::ALL.len() * events().len() * stages().len());
        let unused: Vec<String> = table
            .iter()
            .filter(|r| !r.used)
            .map(|r| format!("{} {} {}", r.phase, r.event, r.stages))
            .collect();
        assert!(unused.is_empty(), "rows no combination reaches: {unused:?}");
    }

    #[test]
    fn final_phases_stay_final_whatever_happens() {
        for phase in Phase::ALL.into_iter().filter(|p| p.is_final()) {
            for event in events() {
                for (_, stages) in stages() {
                    let t = step(&plan(phase, stages), &event);
                    assert_eq!(t, Transition::stay(phase), "{phase:?} + {event:?}");
                }
            }
        }
    }

    #[test]
    fn a_repeated_event_moves_no_further_and_only_repairs() {
        for phase in Phase::ALL {
            for event in events() {
                // The store feeds a task failure once (when newly failed).
                if matches!(event, Event::TaskFailed { .. }) {
                    continue;
                }
                for (name, stages) in stages() {
                    let first = step(&plan(phase, stages.clone()), &event);
                    let again = step(&plan(first.next, stages), &event);
                    assert_eq!(
                        again.next, first.next,
                        "{phase:?} + {event:?} ({name}) twice"
                    );
                    assert!(
                        again.effects.iter().all(Effect::is_repair),
                        "{phase:?} + {event:?} ({name}) twice asks for {:?}",
                        again.effects
                    );
                }
            }
        }
    }

    #[test]
    fn no_transition_moves_a_plan_backwards() {
        for phase in Phase::ALL {
            for event in events() {
                for (_, stages) in stages() {
                    let t = step(&plan(phase, stages), &event);
                    assert!(
                        !t.next.is_before(phase),
                        "{phase:?} + {event:?} → {:?}",
                        t.next
                    );
                    for effect in &t.effects {
                        if let Effect::Enter { phase: to, .. } = effect {
                            assert!(phase.is_before(*to) && !to.is_final(), "{effect:?}");
                        }
                        if let Effect::End { phase: to, .. } = effect {
                            assert!(to.is_final(), "{effect:?}");
                            assert_eq!(*to, t.next, "an end is where the plan goes");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_plan_failed_by_its_tasks_has_one_wording_in_every_live_phase() {
        let tasks = Tasks {
            done: 3,
            blocked: 2,
            total: 7,
            failed: vec![
                FailedTask {
                    path: "a.py".into(),
                    error: Some("gave up after 3 failures".into()),
                },
                FailedTask {
                    path: "b.py".into(),
                    error: None,
                },
            ],
        };
        let expected =
            "2 task(s) failed: a.py (gave up after 3 failures), b.py (no error recorded); 2 blocked; 3 of 7 done";
        for phase in Phase::ALL.into_iter().filter(|p| !p.is_final()) {
            for (_, stages) in stages() {
                let t = step(&plan(phase, stages), &Event::TasksFinished(tasks.clone()));
                assert_eq!(
                    t.effects,
                    vec![Effect::End {
                        phase: Phase::Failed,
                        message: Some(expected.into())
                    }]
                );
            }
        }
    }

    #[test]
    fn stage_messages_name_what_runs() {
        let both = Stages::Known {
            steps: 2,
            shards: 3,
            deploy: Some(vec![10, 100]),
        };
        let t = step(
            &plan(Phase::Running, both.clone()),
            &Event::TasksFinished(Tasks::default()),
        );
        assert_eq!(
            t.effects[0],
            Effect::Enter {
                phase: Phase::Integrating,
                message: "integration: 3 shard(s) of 2 step(s)".into()
            }
        );
        let t = step(
            &plan(Phase::Integrating, both),
            &Event::IntegrationTallied(Verdict::Passed),
        );
        assert_eq!(
            t.effects[1],
            Effect::Enter {
                phase: Phase::Deploying,
                message: "canary rollout requested (deployment 'p', stages [10, 100])".into()
            }
        );
        let t = step(
            &plan(
                Phase::Integrating,
                Stages::Known {
                    steps: 1,
                    shards: 2,
                    deploy: None,
                },
            ),
            &Event::IntegrationTallied(Verdict::Passed),
        );
        assert_eq!(
            t.effects[1],
            Effect::End {
                phase: Phase::Succeeded,
                message: Some("integration passed: 2 shard(s) of 1 step(s)".into())
            }
        );
    }

    #[test]
    fn statuses_map_to_phases_and_back() {
        for phase in Phase::ALL {
            assert_eq!(Phase::of(phase.status()), phase);
            assert_eq!(phase.status().is_final(), phase.is_final());
        }
        assert_eq!(Phase::of(PlanStatus::Rejected), Phase::Failed);
        assert_eq!(Phase::of(PlanStatus::Analyzed), Phase::Running);
    }

    #[test]
    fn long_messages_are_cut() {
        let s = truncate("x".repeat(5_000));
        assert_eq!(s.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert_eq!(truncate("short".into()), "short");
    }
}
