//! This deployment's identity: the `mdmInfo` it writes to Apple to own a location.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use vpp_store::{keys, update, Kv, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    /// Stable for the life of the key-value store; what Apple echoes as `mdmInfo.id`.
    pub id: String,
    pub created_at: DateTime<Utc>,
}

/// The instance identity, created on first use. `candidate_id` is used only if none exists yet;
/// concurrent first uses agree on one id (compare-and-swap).
pub fn ensure(
    kv: &impl Kv,
    candidate_id: &str,
    now: DateTime<Utc>,
) -> Result<Instance, StoreError> {
    update::<Instance, Instance>(kv, &keys::instance(), |cur| match cur {
        Some(i) => Ok((None, i)),
        None => {
            let i = Instance {
                id: candidate_id.to_string(),
                created_at: now,
            };
            Ok((Some(i.clone()), i))
        }
    })
}

/// Our `mdmInfo`: id, the configured name, and where we run as metadata.
pub fn mdm_info(instance: &Instance, name: &str, public_url: Option<&str>) -> vpp_apple::MdmInfo {
    let mut metadata = public_url.unwrap_or("vpp-spin").to_string();
    metadata.truncate(255);
    let mut name = name.to_string();
    name.truncate(100);
    vpp_apple::MdmInfo {
        id: instance.id.clone(),
        name,
        metadata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpp_store::MemoryKv;

    #[test]
    fn first_id_wins() {
        let kv = MemoryKv::default();
        let a = ensure(&kv, "one", Utc::now()).unwrap();
        let b = ensure(&kv, "two", Utc::now()).unwrap();
        assert_eq!(a.id, "one");
        assert_eq!(b.id, "one");
    }
}
