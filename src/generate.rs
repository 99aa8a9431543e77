//! Synthetic but realistic deal-event streams, for benchmarks and load tests.
//!
//! [`Generator`] yields valid CloudEvents for many deals at once, interleaved,
//! each deal walking a plausible lifecycle (opened, rounds of proposals and
//! counters, acceptance, finalization, exclusivity locks, amendments, now and
//! then a termination) so that the fold accepts them. It is deterministic
//! for a given seed and needs no randomness source: a small xorshift PRNG is
//! enough for shaping data.
//!
//! By default a deal lives as long as the stream (up to the fold's limits), so
//! deals grow without end; [`Generator::with_deal_lifetime`] gives each deal a
//! bounded life instead (terminated after about that many events, its slot
//! taken by a fresh deal), which is what a steady-state load such as the soak
//! needs: deals come and go, and what one deal holds stops growing.

use crate::event::{
    Amended, Amount, BoundedList, Capacity, CapacityUnit, Currency, DealEvent, ExclusivityGranted,
    ExclusivityReleased, Finalized, Id, LockKind, Money, NegotiationOpened, Payload, Signatory,
    Terminated, Terms, TermsAccepted, TermsCountered, TermsProposed, Text, Timestamp,
};

/// Parties deals are drawn between.
const CUSTOMERS: [&str; 8] = [
    "openai",
    "anthropic",
    "meta",
    "mistral",
    "xai",
    "cohere",
    "perplexity",
    "character-ai",
];
const PROVIDERS: [&str; 6] = [
    "google-cloud",
    "microsoft",
    "aws",
    "oracle",
    "coreweave",
    "lambda",
];
const UNITS: [CapacityUnit; 4] = [
    CapacityUnit::GpuHours,
    CapacityUnit::TpuChips,
    CapacityUnit::Megawatts,
    CapacityUnit::Gpus,
];

/// Shortest and longest mean deal lifetime, in events: a deal needs a few
/// events to reach finalization, and one that lives longer than the fold's
/// limits allow would be rejected.
pub const MIN_LIFETIME: u32 = 8;
/// See [`MIN_LIFETIME`].
pub const MAX_LIFETIME: u32 = 500;

/// Where one generated deal is in its lifecycle.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    New,
    Negotiating { round: u32 },
    Agreed,
    Finalized,
    Locked,
}

#[derive(Clone, Debug)]
struct DealCursor {
    id: Id,
    customer: usize,
    provider: usize,
    stage: Stage,
    /// The open proposal, and who made it (true = customer).
    open: Option<(Id, bool)>,
    proposals: u32,
    amendments: u32,
    locks: u32,
    /// Events this deal has had.
    events: u32,
    /// With a deal lifetime: the events after which the deal, once
    /// finalized, is terminated.
    lifetime: Option<u32>,
}

/// An endless, deterministic stream of valid deal events over `deals` deals.
pub struct Generator {
    state: u64,
    deals: Vec<DealCursor>,
    /// Deals started so far (numbers the next fresh deal's id).
    started: u64,
    /// Mean events per deal before it is terminated; `None`: deals live on.
    mean_lifetime: Option<u32>,
    /// Business time of the next event, in seconds since the epoch.
    clock: i64,
    next_event: u64,
    seed: u64,
    source: String,
}

impl Generator {
    /// A generator over `deals` deals (at least 1), shaped by `seed`; each
    /// deal lives as long as the stream.
    pub fn new(deals: usize, seed: u64) -> Self {
        Self::build(deals, seed, None)
    }

    /// A generator over `deals` deals at a time whose deals live about
    /// `mean_lifetime` events each (drawn evenly from half to one and a half
    /// times that, at least [`MIN_LIFETIME`]; the first `deals` deals end
    /// sooner, at a random point of that): once a deal has had its events
    /// and is finalized, it is terminated and a fresh deal takes its slot.
    pub fn with_deal_lifetime(deals: usize, seed: u64, mean_lifetime: u32) -> Self {
        assert!(
            (MIN_LIFETIME..=MAX_LIFETIME).contains(&mean_lifetime),
            "a deal lifetime of {mean_lifetime} events is outside {MIN_LIFETIME}..={MAX_LIFETIME}"
        );
        Self::build(deals, seed, Some(mean_lifetime))
    }

    fn build(deals: usize, seed: u64, mean_lifetime: Option<u32>) -> Self {
        assert!(deals >= 1, "a generator needs at least one deal");
        let mut g = Generator {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            deals: Vec::with_capacity(deals),
            started: 0,
            mean_lifetime,
            clock: 1_704_067_200, // 2024-01-01T00:00:00Z
            next_event: 0,
            seed,
            source: "urn:dealledger:generator".to_string(),
        };
        for _ in 0..deals {
            let mut deal = g.fresh_deal();
            // The first deals end at random points of their lives, so that
            // deals end (and fresh ones start) at a steady rate from the
            // start rather than all together after one lifetime.
            if let Some(life) = deal.lifetime {
                deal.lifetime =
                    Some(MIN_LIFETIME + g.below(u64::from(life - MIN_LIFETIME + 1)) as u32);
            }
            g.deals.push(deal);
        }
        g
    }

    /// A new deal, with the next deal number and parties of its own.
    fn fresh_deal(&mut self) -> DealCursor {
        let customer = self.below(CUSTOMERS.len() as u64) as usize;
        let provider = self.below(PROVIDERS.len() as u64) as usize;
        let lifetime = self.mean_lifetime.map(|mean| {
            let low = (mean / 2).max(MIN_LIFETIME);
            let high = mean + mean / 2;
            low + self.below(u64::from(high - low + 1)) as u32
        });
        let id = Id::new(format!("deal-{}-{:07}", self.seed, self.started)).expect("valid id");
        self.started += 1;
        DealCursor {
            id,
            customer,
            provider,
            stage: Stage::New,
            open: None,
            proposals: 0,
            amendments: 0,
            locks: 0,
            events: 0,
            lifetime,
        }
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn terms(&mut self, start: i64) -> Terms {
        let unit = UNITS[self.below(UNITS.len() as u64) as usize];
        let months = 12 + self.below(48) as i64;
        Terms {
            capacity: Capacity {
                quantity: Amount::new(1_000 + self.below(5_000_000)).expect("small"),
                unit,
            },
            price: Money {
                amount_minor: Amount::new(100_000_000 + self.below(1_000_000_000_000))
                    .expect("small"),
                currency: Currency::new("USD").expect("valid"),
            },
            start: ts(start + 30 * 86_400),
            end: ts(start + (30 + months * 30) * 86_400),
        }
    }

    fn party(&self, d: &DealCursor, customer: bool) -> Id {
        let name = if customer {
            CUSTOMERS[d.customer]
        } else {
            PROVIDERS[d.provider]
        };
        Id::new(name).expect("valid id")
    }

    /// The next event of the stream.
    pub fn next_event(&mut self) -> DealEvent {
        let i = self.below(self.deals.len() as u64) as usize;
        self.clock += 1 + self.below(120) as i64;
        let now = self.clock;
        let mut d = self.deals[i].clone();
        let customer = self.party(&d, true);
        let provider = self.party(&d, false);
        let payload = match d.stage {
            Stage::New => {
                d.stage = Stage::Negotiating { round: 0 };
                Payload::NegotiationOpened(NegotiationOpened {
                    customer,
                    provider,
                    partners: BoundedList::default(),
                    scope: Id::new("cloud-compute").expect("valid id"),
                    description: Some(
                        Text::new("Generated capacity deal for load testing").expect("short"),
                    ),
                })
            }
            Stage::Negotiating { round } => {
                let rounds_wanted = 1 + (self.below(4) as u32);
                match d.open.clone() {
                    None => {
                        d.proposals += 1;
                        let pid = Id::new(format!("p{}", d.proposals)).expect("valid id");
                        d.open = Some((pid.clone(), true));
                        let terms = self.terms(now);
                        Payload::TermsProposed(TermsProposed {
                            proposal_id: pid,
                            proposer: customer,
                            terms,
                        })
                    }
                    Some((open, by_customer)) if round < rounds_wanted && d.proposals < 900 => {
                        d.proposals += 1;
                        let pid = Id::new(format!("p{}", d.proposals)).expect("valid id");
                        d.open = Some((pid.clone(), !by_customer));
                        d.stage = Stage::Negotiating { round: round + 1 };
                        let terms = self.terms(now);
                        Payload::TermsCountered(TermsCountered {
                            proposal_id: pid,
                            counters: open,
                            proposer: if by_customer { provider } else { customer },
                            terms,
                        })
                    }
                    Some((open, by_customer)) => {
                        d.stage = Stage::Agreed;
                        Payload::TermsAccepted(TermsAccepted {
                            proposal_id: open,
                            accepted_by: if by_customer { provider } else { customer },
                        })
                    }
                }
            }
            Stage::Agreed => {
                d.stage = Stage::Finalized;
                let (pid, _) = d
                    .open
                    .clone()
                    .expect("an agreed deal has an accepted proposal");
                Payload::Finalized(Finalized {
                    proposal_id: pid,
                    signatories: BoundedList::new(vec![
                        Signatory {
                            party: customer,
                            name: Text::new("Chief Executive Officer").expect("short"),
                            title: None,
                        },
                        Signatory {
                            party: provider,
                            name: Text::new("Head of Cloud Sales").expect("short"),
                            title: None,
                        },
                    ])
                    .expect("two signatories"),
                    effective_date: crate::event::Date::parse(&ts(now).to_string()[..10])
                        .expect("date"),
                    terms: None,
                })
            }
            Stage::Finalized | Stage::Locked
                if d.lifetime.is_some_and(|life| d.events + 1 >= life) =>
            {
                // The deal's last event; its slot starts a fresh deal next time.
                let by_customer = self.below(2) == 0;
                Payload::Terminated(Terminated {
                    terminated_by: if by_customer { customer } else { provider },
                    reason: Text::new("Capacity no longer needed").expect("short"),
                })
            }
            Stage::Finalized if self.below(4) == 0 && d.locks < 50 => {
                d.stage = Stage::Locked;
                d.locks += 1;
                Payload::ExclusivityGranted(ExclusivityGranted {
                    lock_id: Id::new(format!("lock-{}", d.locks)).expect("valid id"),
                    holder: provider,
                    bound_party: customer,
                    scope: Id::new("cloud-compute").expect("valid id"),
                    kind: LockKind::RightOfFirstRefusal,
                    valid_from: ts(now),
                    valid_until: None,
                })
            }
            Stage::Locked if self.below(8) == 0 => {
                d.stage = Stage::Finalized;
                Payload::ExclusivityReleased(ExclusivityReleased {
                    lock_id: Id::new(format!("lock-{}", d.locks)).expect("valid id"),
                    reason: Text::new("Superseded by the amended agreement").expect("short"),
                })
            }
            Stage::Finalized | Stage::Locked => {
                if d.amendments >= 900 {
                    // Keep deals within the fold's limits: start a fresh deal in this slot.
                    self.deals[i] = self.fresh_deal();
                    return self.next_event();
                }
                d.amendments += 1;
                let terms = self.terms(now);
                Payload::Amended(Amended {
                    amendment_id: Id::new(format!("a{}", d.amendments)).expect("valid id"),
                    terms,
                    agreed_by: BoundedList::new(vec![customer, provider]).expect("two parties"),
                    reason: Some(Text::new("Capacity expansion").expect("short")),
                })
            }
        };
        let event = DealEvent::new(
            format!("gen-{}-{:012}", self.seed, self.next_event),
            self.source.clone(),
            d.id.clone(),
            ts(now),
            payload,
        );
        self.next_event += 1;
        d.events += 1;
        self.deals[i] = if matches!(event.payload, Payload::Terminated(_)) {
            self.fresh_deal()
        } else {
            d
        };
        event
    }
}

impl Iterator for Generator {
    type Item = DealEvent;
    fn next(&mut self) -> Option<DealEvent> {
        Some(self.next_event())
    }
}

fn ts(secs: i64) -> Timestamp {
    Timestamp::from_unix_millis(secs * 1000).expect("in range")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_valid_and_accepted_by_the_fold() {
        let a: Vec<Vec<u8>> = Generator::new(50, 7)
            .take(20_000)
            .map(|e| e.to_json())
            .collect();
        let b: Vec<Vec<u8>> = Generator::new(50, 7)
            .take(2_000)
            .map(|e| e.to_json())
            .collect();
        let first_difference = a.iter().zip(&b).position(|(x, y)| x != y);
        assert_eq!(
            first_difference, None,
            "the same seed gave different streams"
        );
        let mut book = crate::deal::DealBook::new();
        for bytes in &a {
            let event = DealEvent::decode(bytes).expect("generated events are valid");
            book.apply(&event)
                .unwrap_or_else(|r| panic!("the fold rejects a generated event: {r}"));
        }
        let mean = a.iter().map(Vec::len).sum::<usize>() / a.len();
        assert!((250..700).contains(&mean), "mean event size {mean} bytes");
    }

    #[test]
    fn with_a_deal_lifetime_deals_end_and_fresh_ones_start() {
        const MEAN: u32 = 20;
        let events: Vec<DealEvent> = Generator::with_deal_lifetime(30, 9, MEAN)
            .take(30_000)
            .collect();
        let mut book = crate::deal::DealBook::new();
        let mut per_deal: std::collections::HashMap<String, (u32, bool)> = Default::default();
        for event in &events {
            let bytes = event.to_json();
            let decoded = DealEvent::decode(&bytes).expect("generated events are valid");
            book.apply(&decoded)
                .unwrap_or_else(|r| panic!("the fold rejects a generated event: {r}"));
            let seen = per_deal.entry(event.deal_id.to_string()).or_default();
            assert!(
                !seen.1,
                "an event after the termination of {}",
                event.deal_id
            );
            seen.0 += 1;
            seen.1 = matches!(event.payload, Payload::Terminated(_));
        }
        // The first 30 deals end at random points of their lives.
        let first = |id: &str| id.rsplit('-').next().and_then(|n| n.parse::<u32>().ok()) < Some(30);
        assert!(
            per_deal
                .iter()
                .any(|(id, d)| first(id) && d.1 && d.0 < MEAN / 2),
            "none of the first deals ended early"
        );
        let ended: Vec<u32> = per_deal
            .iter()
            .filter(|(id, d)| d.1 && !first(id))
            .map(|(_, d)| d.0)
            .collect();
        // 30,000 events over deals of ~20 events: ~1,500 deals, most ended.
        assert!(ended.len() > 1_000, "only {} deals ended", ended.len());
        // A deal ends at its lifetime (10..=30 events) or, if still
        // negotiating then, right after its finalization.
        let longest = *ended.iter().max().expect("deals ended");
        let shortest = *ended.iter().min().expect("deals ended");
        assert!(shortest >= MEAN / 2, "a deal ended after {shortest} events");
        assert!(
            longest <= MEAN * 3 / 2 + 8,
            "a deal ended after {longest} events"
        );
        let mean = ended.iter().map(|&n| u64::from(n)).sum::<u64>() / ended.len() as u64;
        assert!(
            (15..=25).contains(&mean),
            "deals ended after {mean} events on average"
        );
        // Fresh deals are numbered, not derived from the ids before them.
        let longest_id = per_deal.keys().map(String::len).max().expect("deals");
        assert!(
            longest_id <= "deal-9-0000000".len(),
            "deal id of {longest_id} bytes"
        );
        // Without a lifetime, the same seed gives the stream it always gave.
        let old = Generator::new(30, 9).take(1_000).map(|e| e.to_json());
        assert!(
            old.flat_map(|j| DealEvent::decode(&j).map(|e| e.payload))
                .all(|p| !matches!(p, Payload::Terminated(_))),
            "a generator without a deal lifetime terminated a deal"
        );
    }
}
