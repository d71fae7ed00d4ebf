//! A plain map read in front of a moka cache, for keys every request asks for.
//!
//! A moka lookup clones its key to ask, hashes it with SipHash, records the read for its
//! eviction policy and now and then runs its housekeeping: on a cached read that was a few
//! percent of the whole request, per lookup (docs/benchmark.md, "Where the gap goes"). Here a
//! read is one hash of borrowed parts and a map lookup under a read lock.
//!
//! The cache stays the authority: a front entry is only ever a copy of what the cache holds,
//! taken from it, and it stands for a bounded time (set by the owner: never past the cache's
//! own entry). Every change the owner makes to the cache goes through [`Front::forget`] or
//! [`Front::forget_all`] after it; a copy taken from the cache before such a change is not
//! kept (a generation counts the changes), so the front never answers what the cache no longer
//! would. Full, by count or by weight, it is emptied and refills from the cache.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{PoisonError, RwLock};

use tokio::time::Instant;

/// A plain map of copies of a cache's entries. See the module.
pub struct Front<K, V> {
    inner: RwLock<Entries<K, V>>,
    hasher: RandomState,
    max_entries: usize,
    max_weight: usize,
    weigh: fn(&V) -> usize,
}

struct Entries<K, V> {
    /// Changes made to the cache since the start; a copy read before one is not kept.
    generation: u64,
    by_hash: HashMap<u64, Entry<K, V>>,
    weight: usize,
}

/// A copy: its key, to tell a hash's collision from a hit, and until when it stands.
struct Entry<K, V> {
    key: K,
    value: V,
    until: Instant,
}

/// A miss: when it was read, so that the copy taken from the cache after it is kept only if
/// nothing changed in between.
#[derive(Debug, Clone, Copy)]
pub struct Miss {
    generation: u64,
}

impl<K: Eq, V: Clone> Front<K, V> {
    /// A front of at most `max_entries` copies weighing at most `max_weight` by `weigh`.
    pub fn new(max_entries: usize, max_weight: usize, weigh: fn(&V) -> usize) -> Self {
        Self {
            inner: RwLock::new(Entries {
                generation: 0,
                by_hash: HashMap::new(),
                weight: 0,
            }),
            hasher: RandomState::new(),
            max_entries,
            max_weight,
            weigh,
        }
    }

    /// A front of at most `max_entries` copies, whatever they weigh.
    pub fn by_count(max_entries: usize) -> Self {
        Self::new(max_entries, usize::MAX, |_| 0)
    }

    /// The hash of a key, given as borrowed parts that hash as the key does (a tuple of
    /// references hashes as the tuple of values).
    pub fn hash(&self, key: impl Hash) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The copy under `hash` whose key `is_key` accepts, standing at `now`; else a [`Miss`] to
    /// [`keep`](Self::keep) the cache's answer with.
    pub fn get(&self, hash: u64, is_key: impl FnOnce(&K) -> bool, now: Instant) -> Result<V, Miss> {
        let entries = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        match entries.by_hash.get(&hash) {
            Some(entry) if entry.until > now && is_key(&entry.key) => Ok(entry.value.clone()),
            _ => Err(Miss {
                generation: entries.generation,
            }),
        }
    }

    /// Keeps a copy of what the cache answered after `miss`, until `until`, unless the cache
    /// changed since.
    pub fn keep(&self, miss: Miss, hash: u64, key: K, value: V, until: Instant) {
        let weight = (self.weigh)(&value);
        if weight > self.max_weight {
            return;
        }
        let mut entries = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if entries.generation != miss.generation {
            return;
        }
        if entries.by_hash.len() >= self.max_entries || entries.weight + weight > self.max_weight {
            entries.by_hash.clear();
            entries.weight = 0;
        }
        let entry = Entry { key, value, until };
        if let Some(replaced) = entries.by_hash.insert(hash, entry) {
            entries.weight -= (self.weigh)(&replaced.value);
        }
        entries.weight += weight;
    }

    /// The cache's entry under `hash` changed (replaced or removed): its copy goes, and copies
    /// read before now are not kept.
    pub fn forget(&self, hash: u64) {
        let mut entries = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        entries.generation += 1;
        if let Some(gone) = entries.by_hash.remove(&hash) {
            entries.weight -= (self.weigh)(&gone.value);
        }
    }

    /// Every entry of the cache may have changed.
    pub fn forget_all(&self) {
        let mut entries = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        entries.generation += 1;
        entries.by_hash.clear();
        entries.weight = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn front() -> Front<(String, u32), String> {
        Front::new(3, 100, String::len)
    }

    #[test]
    fn a_copy_answers_its_own_key_only_and_until_its_time() {
        let front = front();
        let now = Instant::now();
        let key = ("a".to_owned(), 1);
        let hash = front.hash((&key.0, &key.1));
        assert_eq!(hash, front.hash(&key), "borrowed parts hash as the key");
        let miss = front.get(hash, |k| *k == key, now).unwrap_err();
        let until = now + Duration::from_secs(1);
        front.keep(miss, hash, key.clone(), "value".to_owned(), until);
        assert_eq!(front.get(hash, |k| *k == key, now).unwrap(), "value");
        // Another key under the same hash (a collision) is not this copy.
        assert!(front.get(hash, |k| k.1 == 2, now).is_err());
        assert!(front.get(hash, |k| *k == key, until).is_err());
    }

    #[test]
    fn a_copy_read_before_a_change_is_not_kept() {
        let front = front();
        let now = Instant::now();
        let until = now + Duration::from_secs(1);
        let key = ("a".to_owned(), 1);
        let hash = front.hash(&key);
        let miss = front.get(hash, |k| *k == key, now).unwrap_err();
        front.forget(hash);
        front.keep(miss, hash, key.clone(), "old".to_owned(), until);
        assert!(front.get(hash, |k| *k == key, now).is_err());

        let miss = front.get(hash, |k| *k == key, now).unwrap_err();
        front.keep(miss, hash, key.clone(), "new".to_owned(), until);
        assert_eq!(front.get(hash, |k| *k == key, now).unwrap(), "new");
        front.forget_all();
        assert!(front.get(hash, |k| *k == key, now).is_err());
    }

    #[test]
    fn full_by_count_or_weight_it_empties() {
        let front = front();
        let now = Instant::now();
        let until = now + Duration::from_secs(1);
        let keep = |n: u32, value: &str| {
            let key = ("k".to_owned(), n);
            let hash = front.hash(&key);
            let miss = front.get(hash, |k| *k == key, now).unwrap_err();
            front.keep(miss, hash, key, value.to_owned(), until);
            hash
        };
        let first = keep(1, "x");
        keep(2, "x");
        keep(3, "x");
        assert!(front.get(first, |k| k.1 == 1, now).is_ok());
        keep(4, "x");
        assert!(
            front.get(first, |k| k.1 == 1, now).is_err(),
            "a fourth empties"
        );

        let heavy = keep(5, &"y".repeat(60));
        keep(6, &"z".repeat(60));
        assert!(
            front.get(heavy, |k| k.1 == 5, now).is_err(),
            "over 100 empties"
        );
        let too_heavy = keep(7, &"w".repeat(101));
        assert!(front.get(too_heavy, |k| k.1 == 7, now).is_err());
    }
}
