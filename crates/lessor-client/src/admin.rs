//! Typed calls of the access-control routes: namespaces, users, API keys, roles and role bindings.
//!
//! Each is [`Client::call`] with its route filled in. They need a key allowed to administer
//! ([`Client::with_api_key`]) unless the server runs without auth or with its door open.

use lessor_proto::{
    APIKeyCreateRequest, APIKeyCreateResponse, APIKeysDeleteRequest, APIKeysListRequest, APIKeysListResponse,
    NamespaceInfo, NamespacesDeleteRequest, NamespacesListRequest, NamespacesListResponse,
    RoleBindingCreateRequest, RoleBindingCreateResponse, RoleBindingDeleteRequest, RoleBindingsListRequest,
    RoleBindingsListResponse, RoleCreateRequest, RoleCreateResponse, RoleUpdateRequest, RolesDeleteRequest,
    RolesListRequest, RolesListResponse, UserCreateRequest, UserCreateResponse, UsersDeleteRequest,
    UsersListRequest, UsersListResponse,
};

use crate::{routes, Client, ClientError};

impl Client {
    /// `POST /v1/namespaces.create`: creates a namespace (`created_at` is the server's to set).
    ///
    /// # Errors
    /// Any [`ClientError`]; a taken or reserved name is a 400 [`ClientError::Api`].
    pub async fn namespaces_create(&self, info: &NamespaceInfo) -> Result<(), ClientError> {
        self.call::<routes::NamespacesCreate>(info).await.map(drop)
    }

    /// `POST /v1/namespaces.update`: replaces a namespace's description and key tag.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn namespaces_update(&self, info: &NamespaceInfo) -> Result<(), ClientError> {
        self.call::<routes::NamespacesUpdate>(info).await.map(drop)
    }

    /// `POST /v1/namespaces.list`: one page of namespaces, by name.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn namespaces_list(
        &self,
        req: &NamespacesListRequest,
    ) -> Result<NamespacesListResponse, ClientError> {
        self.call::<routes::NamespacesList>(req).await
    }

    /// `POST /v1/namespaces.delete`: deletes a namespace without role bindings, roles or queues.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn namespaces_delete(&self, req: &NamespacesDeleteRequest) -> Result<(), ClientError> {
        self.call::<routes::NamespacesDelete>(req).await.map(drop)
    }

    /// `POST /v1/users.create`: creates a user; the reply carries its id.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn users_create(&self, req: &UserCreateRequest) -> Result<UserCreateResponse, ClientError> {
        self.call::<routes::UsersCreate>(req).await
    }

    /// `POST /v1/users.list`: one page of users, in creation order.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn users_list(&self, req: &UsersListRequest) -> Result<UsersListResponse, ClientError> {
        self.call::<routes::UsersList>(req).await
    }

    /// `POST /v1/users.delete`: deletes a user with its keys and role bindings.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn users_delete(&self, req: &UsersDeleteRequest) -> Result<(), ClientError> {
        self.call::<routes::UsersDelete>(req).await.map(drop)
    }

    /// `POST /v1/apikeys.create`: mints a key. The reply's `key` is the only copy there will ever be.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn apikeys_create(
        &self,
        req: &APIKeyCreateRequest,
    ) -> Result<APIKeyCreateResponse, ClientError> {
        self.call::<routes::ApiKeysCreate>(req).await
    }

    /// `POST /v1/apikeys.list`: one page of key metadata (never the keys).
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn apikeys_list(&self, req: &APIKeysListRequest) -> Result<APIKeysListResponse, ClientError> {
        self.call::<routes::ApiKeysList>(req).await
    }

    /// `POST /v1/apikeys.delete`: revokes a key.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn apikeys_delete(&self, req: &APIKeysDeleteRequest) -> Result<(), ClientError> {
        self.call::<routes::ApiKeysDelete>(req).await.map(drop)
    }

    /// `POST /v1/roles.create`: creates a role in a namespace; the reply carries its id.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn roles_create(&self, req: &RoleCreateRequest) -> Result<RoleCreateResponse, ClientError> {
        self.call::<routes::RolesCreate>(req).await
    }

    /// `POST /v1/roles.update`: replaces a role's permissions.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn roles_update(&self, req: &RoleUpdateRequest) -> Result<(), ClientError> {
        self.call::<routes::RolesUpdate>(req).await.map(drop)
    }

    /// `POST /v1/roles.list`: one page of a namespace's roles.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn roles_list(&self, req: &RolesListRequest) -> Result<RolesListResponse, ClientError> {
        self.call::<routes::RolesList>(req).await
    }

    /// `POST /v1/roles.delete`: deletes a role nobody is bound to.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn roles_delete(&self, req: &RolesDeleteRequest) -> Result<(), ClientError> {
        self.call::<routes::RolesDelete>(req).await.map(drop)
    }

    /// `POST /v1/rolebindings.create`: binds a user to a role of a namespace; the reply carries the binding's id.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn rolebindings_create(
        &self,
        req: &RoleBindingCreateRequest,
    ) -> Result<RoleBindingCreateResponse, ClientError> {
        self.call::<routes::RoleBindingsCreate>(req).await
    }

    /// `POST /v1/rolebindings.list`: one page of a namespace's bindings (one user's with `user_id_filter`).
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn rolebindings_list(
        &self,
        req: &RoleBindingsListRequest,
    ) -> Result<RoleBindingsListResponse, ClientError> {
        self.call::<routes::RoleBindingsList>(req).await
    }

    /// `POST /v1/rolebindings.delete`: removes a user's binding to a role.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn rolebindings_delete(&self, req: &RoleBindingDeleteRequest) -> Result<(), ClientError> {
        self.call::<routes::RoleBindingsDelete>(req).await.map(drop)
    }
}
