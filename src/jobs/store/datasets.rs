//! Uploaded datasets: stored whole in the job store, so any worker can read them.

use anyhow::Result;
use serde::Serialize;
use sqlx::Row;

use super::{now_ms, JobStore};

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DatasetInfo {
    pub id: String,
    pub name: Option<String>,
    pub records: i64,
    pub bytes: i64,
    pub sha256: String,
    pub created_at: i64,
}

impl JobStore {
    /// Stores a dataset's text (up to the dataset size limit); its sha256 is computed on
    /// the blocking pool, not on the async threads.
    pub async fn add_dataset(
        &self,
        name: Option<&str>,
        content: String,
        records: i64,
    ) -> Result<DatasetInfo> {
        use sha2::Digest;
        let id = uuid::Uuid::new_v4().to_string();
        let (content, sha) = tokio::task::spawn_blocking(move || {
            let sha = hex::encode(sha2::Sha256::digest(content.as_bytes()));
            (content, sha)
        })
        .await?;
        let content = content.as_str();
        let now = now_ms();
        sqlx::query("INSERT INTO datasets (id, name, records, bytes, sha256, content, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(&id)
            .bind(name)
            .bind(records)
            .bind(content.len() as i64)
            .bind(&sha)
            .bind(content)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(DatasetInfo {
            id,
            name: name.map(String::from),
            records,
            bytes: content.len() as i64,
            sha256: sha,
            created_at: now,
        })
    }

    pub async fn dataset_content(&self, id: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT content FROM datasets WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get::<String, _>("content").map_err(Into::into))
            .transpose()
    }
}
